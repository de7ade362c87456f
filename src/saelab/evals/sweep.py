"""Every coder at every L0 on the same tokens: reconstruction, delta loss, usage, overlap.

For each batch of windows: one clean forward pass (the site's activations and the clean
next-token distribution), one zero-ablation pass, then for each coder: code, reconstruct,
splice the reconstruction back in and score. So every coder sees exactly the same tokens
and the clean pass is paid once.

Under torchrun each rank scores a consecutive slice of the batches (the same batches one
process makes), and the ranks' running sums are then gathered and added in rank order, which
is batch order: the per-window sums, and so every point estimate and interval, are those of
one process (sums of floats to rounding).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.coding import (
    ENCODER_METHODS,
    PURSUIT_METHODS,
    Coder,
    LatentScale,
    PursuitTrace,
    SparseCode,
)
from saelab.distributed import World, join_world
from saelab.errors import SaelabError
from saelab.evals.intervals import (
    LEVEL,
    RESAMPLES,
    Columns,
    Interval,
    interval,
    paired_difference,
    resample_counts,
    weighted,
)
from saelab.evals.metrics import LOG10_DENSITY_BINS, LatentUsage, ReconstructionMetrics
from saelab.evals.overlap import jaccard, order_cosines, top_kept
from saelab.evals.splice import CleanPass, clean_pass, spliced_loss
from saelab.evals.windows import (
    ATTRIBUTION_METRICS,
    LM_METRICS,
    METRICS,
    PER_CODER,
    PRINCIPAL_METRICS,
    SHARED,
    WindowSums,
    coder_sums,
    shared_sums,
)
from saelab.lm import LanguageModel
from saelab.saes import SAE

GEOMETRY_EDGES = np.linspace(0.0, 1.0, 41)  # cosine-to-span histogram edges
TOP_M = 8  # overlap: how many of the encoder's largest latents a pursuit keeps
SMALL_WEIGHT = 0.1  # the weight profile: activations below this share of their code's largest


CoderName = Literal["encoder", "encoder-refit", "encoder-scaled", "mp", "gp", "omp",
                    "nn-encoder-refit", "nn-mp", "nn-gp", "nn-omp"]
"""A coder of a comparison: a coding method, `nn-` first for its non-negative variant (the
pursuits and the refit; the encoder's activations are >= 0 by its activation already)."""
CODER_NAMES: tuple[str, ...] = get_args(CoderName)
NONNEGATIVE = "nn-"


@dataclass(frozen=True)
class CoderSpec:
    """One row of a comparison: a coder, at `k` latents per token (pursuits) or at the
    encoder's own L0 (`k` None: the encoder and its two fixes), with its activations kept
    >= 0 or not."""

    coder: str
    k: int | None = None
    nonnegative: bool = False

    @classmethod
    def named(cls, name: str, k: int | None = None) -> CoderSpec:
        """The spec of a `CoderName` (`nn-gp` -> gp, non-negative)."""
        if name not in CODER_NAMES:
            raise SaelabError(f"unknown coder {name!r}", expected=", ".join(CODER_NAMES),
                              found=name, fix="pick coders from that list")
        return cls(name.removeprefix(NONNEGATIVE), k, name.startswith(NONNEGATIVE))

    @property
    def name(self) -> str:
        """The coder with its sign: `gp`, `nn-gp` (non-negative), `encoder`, ..."""
        return NONNEGATIVE + self.coder if self.nonnegative else self.coder

    @property
    def label(self) -> str:
        return self.name if self.k is None else f"{self.name} k={self.k}"


def plan(coders: Sequence[str], ks: Sequence[int], matched_k: int | None) -> list[CoderSpec]:
    """The encoder-based coders once each; each pursuit at every k and at `matched_k` (the
    encoder's L0, rounded), so that every coder has a row at the same L0 (None: at the ks
    only)."""
    specs = [CoderSpec.named(name) for name in coders]
    pursuit_ks = sorted({*ks} | ({matched_k} if matched_k is not None else set()))
    return [s for s in specs if s.coder in ENCODER_METHODS] + [
        CoderSpec(s.coder, k, s.nonnegative) for s in specs if s.coder in PURSUIT_METHODS
        for k in pursuit_ks]


@dataclass
class _Track:
    """Running sums for one CoderSpec."""

    spec: CoderSpec
    coder: Coder
    recon: ReconstructionMetrics
    usage: LatentUsage
    sums: WindowSums = field(default_factory=lambda: WindowSums(PER_CODER))
    negative: int = 0
    spliced: bool = True  # whether the reconstruction is spliced in (delta loss, KL)
    small: int = 0  # non-zero activations below SMALL_WEIGHT of their code's largest
    nonzero: int = 0
    seconds: float = 0.0
    geometry: list[Tensor] = field(default_factory=list)


def run_sweep(lm: LanguageModel, sae: SAE, site: str, windows: np.ndarray,
              specs: Sequence[CoderSpec], *, matched_k: int, scale: LatentScale | None = None,
              batch_tokens: int = 1024, geometry_tokens: int = 512,
              spliced: Callable[[CoderSpec], bool] | None = None, attribution: bool = False,
              principal: Tensor | None = None,
              passes: dict[int, BatchPasses] | None = None) -> Sweep:
    """Score `specs` on `windows` [n, T] (int64 token ids, BOS first). `spliced` says which
    rows are spliced into the model for the LM metrics (default all): a spliced row costs
    a forward pass and the full vocabulary head per batch, a row that is not costs only its
    coding, and its delta loss, KL and loss recovered are None. With `attribution`, each
    batch also gets the clean loss's gradient at the site (one backward pass, shared by the
    coders) and each row the first-order prediction of its delta loss; with `principal`
    (orthonormal directions [d, m]), each row the share of its error in their span.

    The clean, zero-ablation and gradient passes depend only on the windows, not on the
    dictionary: `passes` (a dict kept by the caller) holds them by batch, so sweeps of several
    dictionaries over the same windows pay for them once."""
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    tracks = [_Track(s, Coder(sae, s.coder, k=s.k, nonnegative=s.nonnegative, scale=scale),
                     ReconstructionMetrics(), LatentUsage(sae.n_latents),
                     spliced=spliced is None or spliced(s)) for s in specs]
    matched = [t for t in tracks if t.spec.k in (None, matched_k)]
    pairs = np.zeros((len(matched), len(matched)))
    kept = np.zeros(len(matched))
    shared = WindowSums(SHARED)
    per_batch = max(1, batch_tokens // windows.shape[1])
    world = join_world(W_dec.device.type)
    starts = range(0, len(windows), per_batch)
    mine = starts[world.slice(len(starts))]
    total = sum(len(windows[s:s + per_batch]) for s in mine) * (windows.shape[1] - 1) \
        * len(tracks)
    with tqdm(total=total, unit="tok", desc="compare", disable=None if world.is_main else True
              ) as bar:
        for start in mine:
            ids = torch.from_numpy(windows[start:start + per_batch])
            batch = _passes(lm, site, ids, attribution, passes, start)
            clean, gradient = batch.clean, batch.gradient
            x_BD = clean.activations.reshape(-1, clean.activations.shape[-1]).float()
            shared.add(**shared_sums(clean.activations, clean.loss, batch.zero))
            codes = {}
            for t in tracks:
                code = _score(t, lm, site, clean, x_BD, W_dec, b_dec, trace=start == 0,
                              gradient=gradient, principal=principal)
                if start == 0:
                    t.geometry.append(_geometry(t, code[:geometry_tokens], code.trace, W_dec))
                codes[t.spec] = code
                bar.update(len(x_BD))
            _overlap(matched, codes, sae.n_latents, pairs, kept)
    if world.size > 1:
        pairs, kept = _join(world, tracks, shared, pairs, kept)
    n_batches = len(starts)
    columns = {t.spec.label: {**shared.columns(), **t.sums.columns()} for t in tracks}
    missing = (() if attribution else ATTRIBUTION_METRICS) + (
        () if principal is not None else PRINCIPAL_METRICS)
    return Sweep(_results(tracks, matched, pairs / n_batches, kept / n_batches, columns,
                          matched_k, missing), columns)


def _join(world: World, tracks: list[_Track], shared: WindowSums, pairs: np.ndarray,
          kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's sums added into this rank's, in rank order (= batch order)."""
    state = ([(t.recon, t.usage, t.sums, t.negative, t.small, t.nonzero, t.seconds,
               t.geometry) for t in tracks], shared, pairs, kept)
    ranks = world.gather(state)
    for t in tracks:  # start again from rank 0's sums, which are this rank's on rank 0
        t.recon, t.usage, t.sums = ReconstructionMetrics(), LatentUsage(t.usage.n_latents), \
            WindowSums(PER_CODER)
        t.negative = t.small = t.nonzero = 0
        t.seconds, t.geometry = 0.0, []
    shared.parts = {name: [] for name in shared.names}
    pairs, kept = np.zeros_like(pairs), np.zeros_like(kept)
    for rank_tracks, rank_shared, rank_pairs, rank_kept in ranks:
        for t, (recon, usage, sums, negative, small, nonzero, seconds, geometry) in zip(
                tracks, rank_tracks, strict=True):
            t.recon.merge(recon)
            t.usage.merge(usage)
            t.sums.extend(sums)
            t.negative += negative
            t.small += small
            t.nonzero += nonzero
            t.seconds += seconds
            t.geometry += geometry
        shared.extend(rank_shared)
        pairs, kept = pairs + rank_pairs, kept + rank_kept
    return pairs, kept


@dataclass(frozen=True)
class BatchPasses:
    """What a batch of windows costs before any coder: its clean pass, its zero-ablation
    loss [batch, T - 2] and (for attributions) the clean loss's gradient at the site."""

    clean: CleanPass
    zero: Tensor
    gradient: Tensor | None


def _passes(lm: LanguageModel, site: str, ids: Tensor, attribution: bool,
            cache: dict[int, BatchPasses] | None, start: int) -> BatchPasses:
    held = cache.get(start) if cache is not None else None
    if held is not None and torch.equal(held.clean.input_ids, ids) and (
            held.gradient is not None or not attribution):
        return held
    clean = clean_pass(lm, site, ids)
    zero = spliced_loss(lm, site, clean, torch.zeros_like(clean.activations))[0]
    batch = BatchPasses(clean, zero, lm.loss_gradient(ids, site) if attribution else None)
    if cache is not None:
        cache[start] = batch
    return batch


def _score(t: _Track, lm: LanguageModel, site: str, clean: CleanPass, x_BD: Tensor,
           W_dec: Tensor, b_dec: Tensor, trace: bool, gradient: Tensor | None,
           principal: Tensor | None) -> SparseCode:
    began = time.perf_counter()
    code = t.coder(x_BD, return_trace=trace and t.spec.coder in PURSUIT_METHODS)
    t.seconds += time.perf_counter() - began
    x_hat_BD = code.decode(W_dec, b_dec)
    t.recon.update(x_BD, x_hat_BD, code)
    t.usage.update(code)
    t.negative += int((code.values < 0).sum())
    size = code.values.abs()
    if size.shape[1]:
        live = size > 0
        t.small += int((live & (size < SMALL_WEIGHT * size.amax(dim=1, keepdim=True))).sum())
        t.nonzero += int(live.sum())
    x_hat_BTD = x_hat_BD.view_as(clean.activations)
    if t.spliced:
        loss, kl = spliced_loss(lm, site, clean, x_hat_BTD)
    else:  # reconstruction only: no forward pass, the LM metrics stay NaN
        loss = kl = torch.full_like(clean.loss, float("nan"))
    t.sums.add(**coder_sums(clean.activations, x_hat_BTD,
                            code.l0().view(clean.activations.shape[:2]), loss, kl,
                            gradient, principal))
    return code


def _geometry(t: _Track, code: SparseCode, trace: PursuitTrace | None, W_dec: Tensor
              ) -> Tensor:
    """Cosine of each chosen latent to the span of those chosen before it: pursuits in the
    order they selected (their trace), encoder codes in order of decreasing value."""
    if trace is not None:
        cos = trace.span_cosine[1:, : len(code)]
    else:
        cos = order_cosines(code, W_dec)[:, 1:]
    return cos[torch.isfinite(cos)].cpu()


def _overlap(matched: list[_Track], codes: dict[CoderSpec, SparseCode], n_latents: int,
             pairs: np.ndarray, kept: np.ndarray) -> None:
    """Add this batch's mean Jaccard of every pair of supports at the matched L0, and the
    fraction of the encoder's TOP_M largest latents each coder keeps."""
    supports = [codes[t.spec].support(n_latents) for t in matched]
    for i, a in enumerate(supports):
        for j, b in enumerate(supports):
            pairs[i, j] += float(jaccard(a, b).double().mean())
    encoder = next((codes[t.spec] for t in matched if t.spec.coder == "encoder"), None)
    if encoder is not None:
        for i, s in enumerate(supports):
            kept[i] += float(top_kept(encoder, s, TOP_M).double().mean())


def _results(tracks: list[_Track], matched: list[_Track], jac: np.ndarray, kept: np.ndarray,
             columns: dict[str, Columns], matched_k: int, missing: tuple[str, ...]
             ) -> dict[str, Any]:
    some = next(iter(columns.values()))
    totals = weighted(some, np.ones(len(some["tokens"])))
    counts = resample_counts(len(some["tokens"]))
    encoder = next((t for t in matched if t.spec.coder == "encoder"), None)
    rows = []
    for t in tracks:
        r, u = t.recon.result(), t.usage.result()
        cols = columns[t.spec.label]
        measured = [name for name in METRICS if name not in missing
                    and (t.spliced or name not in LM_METRICS)]
        ci = {name: interval(METRICS[name], cols, counts) for name in measured}
        row = {"coder": t.spec.coder, "name": t.spec.name, "k": t.spec.k, "label": t.spec.label,
               "nonnegative": t.spec.nonnegative,
               **{name: ci[name].value if name in ci else None for name in METRICS},
               "mse": r["mse"], "cosine": r["cosine"],
               "loss": float(totals["clean"] / totals["positions"]) + ci["delta_loss"].value
               if t.spliced else None, "spliced": t.spliced,
               "intervals": {name: [i.low, i.high] for name, i in ci.items()},
               "dead": u["dead"], "dead_fraction": u["dead_fraction"],
               "dense": u["dense"], "negative_fraction": t.negative / max(
                   1, sum(int(k) * c for k, c in r["l0_histogram"].items())),
               "small_weight_fraction": t.small / max(1, t.nonzero),
               "tokens": r["tokens"], "tokens_per_s": r["tokens"] / max(t.seconds, 1e-9)}
        if encoder is not None and t in matched and t is not encoder:
            row["vs_encoder"] = {
                name: _difference(paired_difference(metric, cols, columns[encoder.spec.label],
                                                    counts))
                for name, metric in METRICS.items()
                if name in measured and name != "l0" and (encoder.spliced
                                                          or name not in LM_METRICS)}
        rows.append(row)
    samples = {t.spec.label: np.abs(t.usage.value_sample()) for t in matched}
    pooled = np.concatenate([s[s > 0] for s in samples.values()] or [np.ones(1)])
    lo, hi = np.log10(np.percentile(pooled, [0.1, 99.9]))
    value_edges = np.linspace(lo, hi + 1e-6, 49)
    geometry = {t.spec.label: torch.cat(t.geometry).double().numpy() for t in matched}
    has_encoder = any(t.spec.coder == "encoder" for t in matched)
    return {
        "clean_loss": float(totals["clean"] / totals["positions"]),
        "zero_ablation_loss": float(totals["zero"] / totals["positions"]),
        "scored_positions": int(totals["positions"]), "windows": len(some["tokens"]),
        "intervals": {"method": "percentile bootstrap over windows", "level": LEVEL,
                      "resamples": RESAMPLES},
        "matched_k": matched_k, "rows": rows,
        "l0_histograms": {t.spec.label: t.recon.result()["l0_histogram"] for t in matched},
        "density": {"log10_edges": LOG10_DENSITY_BINS.tolist(),
                    "histograms": {t.spec.label: t.usage.result()["log10_density_histogram"]
                                   for t in matched}},
        "values": {"log10_abs_edges": value_edges.tolist(),
                   "histograms": {label: np.histogram(np.log10(s[s > 0]), value_edges)[0].tolist()
                                  for label, s in samples.items()}},
        "overlap": {"labels": [t.spec.label for t in matched], "jaccard": jac.tolist(),
                    "top_m": TOP_M, "encoder_top_kept": dict(zip(
                        [t.spec.label for t in matched], kept.tolist(), strict=True))
                    if has_encoder else {}},
        "geometry": {"edges": GEOMETRY_EDGES.tolist(),
                     "histograms": {label: np.histogram(c, GEOMETRY_EDGES)[0].tolist()
                                    for label, c in geometry.items()},
                     "mean": {label: float(c.mean()) if len(c) else float("nan")
                              for label, c in geometry.items()}},
    }


def _difference(i: Interval) -> dict[str, float | bool]:
    return {**i.as_json(), "excludes_zero": i.excludes_zero}


@dataclass(frozen=True)
class Sweep:
    """A sweep's results (what results.json holds) and its per-window sums by row label
    (what its intervals were drawn from; `compare` saves them as windows.npz)."""

    results: dict[str, Any]
    columns: dict[str, Columns]
