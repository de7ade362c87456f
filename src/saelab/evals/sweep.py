"""Every coder at every L0 on the same tokens: reconstruction, delta loss, usage, overlap.

For each batch of windows: one clean forward pass (the site's activations and the clean
next-token distribution), one zero-ablation pass, then for each coder: code, reconstruct,
splice the reconstruction back in and score. So every coder sees exactly the same tokens
and the clean pass is paid once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.coding import (
    ENCODER_METHODS,
    METHODS,
    PURSUIT_METHODS,
    Coder,
    LatentScale,
    PursuitTrace,
    SparseCode,
)
from saelab.errors import SaelabError
from saelab.evals.metrics import LOG10_DENSITY_BINS, LatentUsage, ReconstructionMetrics
from saelab.evals.overlap import jaccard, order_cosines, top_kept
from saelab.evals.splice import CleanPass, clean_pass, spliced_loss
from saelab.lm import LanguageModel
from saelab.saes import SAE

GEOMETRY_EDGES = np.linspace(0.0, 1.0, 41)  # cosine-to-span histogram edges
TOP_M = 8  # overlap: how many of the encoder's largest latents a pursuit keeps


@dataclass(frozen=True)
class CoderSpec:
    """One row of a comparison: a coder, at `k` latents per token (pursuits) or at the
    encoder's own L0 (`k` None: the encoder and its two fixes)."""

    coder: str
    k: int | None = None

    @property
    def label(self) -> str:
        return self.coder if self.k is None else f"{self.coder} k={self.k}"


def plan(coders: Sequence[str], ks: Sequence[int], matched_k: int) -> list[CoderSpec]:
    """The encoder-based coders once each; each pursuit at every k and at `matched_k` (the
    encoder's L0, rounded), so that every coder has a row at the same L0."""
    unknown = [c for c in coders if c not in METHODS]
    if unknown:
        raise SaelabError(f"unknown coder {unknown[0]!r}", expected=", ".join(METHODS),
                          found=", ".join(coders), fix="pick coders from that list")
    pursuit_ks = sorted({*ks, matched_k})
    return [CoderSpec(c) for c in coders if c in ENCODER_METHODS] + [
        CoderSpec(c, k) for c in coders if c in PURSUIT_METHODS for k in pursuit_ks]


@dataclass
class _Track:
    """Running sums for one CoderSpec."""

    spec: CoderSpec
    coder: Coder
    recon: ReconstructionMetrics
    usage: LatentUsage
    loss_sum: float = 0.0
    kl_sum: float = 0.0
    negative: int = 0
    seconds: float = 0.0
    geometry: list[Tensor] = field(default_factory=list)


def run_sweep(lm: LanguageModel, sae: SAE, site: str, windows: np.ndarray,
              specs: Sequence[CoderSpec], *, matched_k: int, scale: LatentScale | None = None,
              nonnegative: bool = False, batch_tokens: int = 1024,
              geometry_tokens: int = 512) -> dict[str, Any]:
    """Score `specs` on `windows` [n, T] (int64 token ids, BOS first); returns the results
    dictionary `compare` writes as results.json."""
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    tracks = [_Track(s, Coder(sae, s.coder, k=s.k, nonnegative=nonnegative, scale=scale),
                     ReconstructionMetrics(), LatentUsage(sae.n_latents)) for s in specs]
    matched = [t for t in tracks if t.spec.k in (None, matched_k)]
    pairs = np.zeros((len(matched), len(matched)))
    kept = np.zeros(len(matched))
    clean_sum = zero_sum = 0.0
    scored = 0
    per_batch = max(1, batch_tokens // windows.shape[1])
    total = len(windows) * (windows.shape[1] - 1) * len(tracks)
    with tqdm(total=total, unit="tok", desc="compare", disable=None) as bar:
        for start in range(0, len(windows), per_batch):
            ids = torch.from_numpy(windows[start:start + per_batch])
            clean = clean_pass(lm, site, ids)
            x_BD = clean.activations.reshape(-1, clean.activations.shape[-1]).float()
            clean_sum += float(clean.loss.double().sum())
            zero_sum += float(spliced_loss(lm, site, clean,
                                           torch.zeros_like(clean.activations))[0].double().sum())
            scored += clean.loss.numel()
            codes = {}
            for t in tracks:
                code = _score(t, lm, site, clean, x_BD, W_dec, b_dec, trace=start == 0)
                if start == 0:
                    t.geometry.append(_geometry(t, code[:geometry_tokens], code.trace, W_dec))
                codes[t.spec] = code
                bar.update(len(x_BD))
            _overlap(matched, codes, sae.n_latents, pairs, kept)
    n_batches = -(-len(windows) // per_batch)
    return _results(tracks, matched, pairs / n_batches, kept / n_batches, clean_sum / scored,
                    zero_sum / scored, scored, matched_k)


def _score(t: _Track, lm: LanguageModel, site: str, clean: CleanPass, x_BD: Tensor,
           W_dec: Tensor, b_dec: Tensor, trace: bool) -> SparseCode:
    began = time.perf_counter()
    code = t.coder(x_BD, return_trace=trace and t.spec.coder in PURSUIT_METHODS)
    t.seconds += time.perf_counter() - began
    x_hat_BD = code.decode(W_dec, b_dec)
    t.recon.update(x_BD, x_hat_BD, code)
    t.usage.update(code)
    t.negative += int((code.values < 0).sum())
    loss, kl = spliced_loss(lm, site, clean, x_hat_BD.view_as(clean.activations))
    t.loss_sum += float(loss.double().sum())
    t.kl_sum += float(kl.double().sum())
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
             clean: float, zero: float, scored: int, matched_k: int) -> dict[str, Any]:
    rows = []
    for t in tracks:
        loss = t.loss_sum / scored
        r, u = t.recon.result(), t.usage.result()
        rows.append({"coder": t.spec.coder, "k": t.spec.k, "label": t.spec.label,
                     "l0": r["l0"], "fvu": r["fvu"], "mse": r["mse"], "cosine": r["cosine"],
                     "loss": loss, "delta_loss": loss - clean,
                     "loss_recovered": (zero - loss) / (zero - clean) if zero != clean
                     else float("nan"), "kl": t.kl_sum / scored,
                     "dead": u["dead"], "dead_fraction": u["dead_fraction"],
                     "dense": u["dense"], "negative_fraction": t.negative / max(
                         1, sum(int(k) * c for k, c in r["l0_histogram"].items())),
                     "tokens": r["tokens"], "tokens_per_s": r["tokens"] / max(t.seconds, 1e-9)})
    samples = {t.spec.label: np.abs(t.usage.value_sample()) for t in matched}
    pooled = np.concatenate([s[s > 0] for s in samples.values()] or [np.ones(1)])
    lo, hi = np.log10(np.percentile(pooled, [0.1, 99.9]))
    value_edges = np.linspace(lo, hi + 1e-6, 49)
    geometry = {t.spec.label: torch.cat(t.geometry).double().numpy() for t in matched}
    has_encoder = any(t.spec.coder == "encoder" for t in matched)
    return {
        "clean_loss": clean, "zero_ablation_loss": zero, "scored_positions": scored,
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
