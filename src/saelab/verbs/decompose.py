"""`saelab decompose`: code an activation store with an SAE's dictionary, report FVU and L0."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations import ActivationStore
from saelab.coding import Coder, LatentScale, SparseCode, fit_scale
from saelab.errors import SaelabError
from saelab.formats import load_sae
from saelab.saes import SAE

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DecomposeConfig:
    sae: str
    """The SAE: a folder or file in any layout saelab reads (SAELens, Gemma Scope, sparsify,
    dictionary_learning), hf://OWNER/REPO/PATH, or RELEASE:SAE_ID (a SAELens release)."""
    activations: Path
    """Activation store from `saelab cache` (OUT or OUT/SITE)."""
    out: Path
    """File for the codes (safetensors: indices and values, [tokens, k])."""
    method: Literal["encoder", "encoder-refit", "encoder-scaled", "mp", "gp", "omp"] = "gp"
    """Coder: the SAE's encoder, its support refitted, its code rescaled, or matching /
    gradient / orthogonal matching pursuit."""
    k: int | None = None
    """Latents per token for mp, gp and omp."""
    tol: float | None = None
    """mp/gp/omp: also stop a token once its residual norm is below tol times its norm."""
    nonnegative: bool = False
    """Keep latent activations >= 0 (the non-negative pursuits and NNLS refit)."""
    scale: Path | None = None
    """encoder-scaled: a scale file to reuse; without one, a per-latent scale is fitted on
    the store's last --fit-tokens rows (not coded) and saved beside --out."""
    fit_tokens: int = 4096
    """encoder-scaled: held-out rows to fit the scale on when no --scale is given."""
    tokens: int | None = None
    """Code only the first N rows of the store (default: all)."""
    batch_size: int = 4096
    """Rows coded at once."""
    device: str = "cpu"
    """Device to code on: cpu, cuda, cuda:1, ..."""
    bf16_screen: bool = True
    """mp/gp/omp: find each step's latent through a bfloat16 product checked in float32 (the
    same selection, faster); --no-bf16-screen computes every correlation in float32."""


def run_decompose(cfg: DecomposeConfig) -> dict[str, float]:
    """Code the store; write the codes; return FVU, mean L0, tokens and tokens/s."""
    store = ActivationStore(cfg.activations)
    # the store's norm scale serves SAEs trained on normalised inputs that lack their factor
    sae = load_sae(cfg.sae, device=cfg.device,
                   input_scale=store.normalisation["norm_scale"])
    _check_pair(sae, store, cfg)
    n = min(cfg.tokens or len(store), len(store))
    scale = _scale(cfg, sae, store) if cfg.method == "encoder-scaled" else None
    if cfg.method == "encoder-scaled" and cfg.scale is None:
        n = min(n, len(store) - cfg.fit_tokens)
    coder = Coder(sae, cfg.method, k=cfg.k, tol=cfg.tol, nonnegative=cfg.nonnegative,
                  scale=scale, bf16_screen=cfg.bf16_screen)
    sq_err = total = sq_norm = 0.0
    sum_x = torch.zeros(store.d_model, dtype=torch.float64)
    codes: list[SparseCode] = []
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    start = time.perf_counter()
    for x, code in coded_batches(store, coder, n, cfg.batch_size, cfg.device, cfg.method):
        err = x - code.decode(W_dec, b_dec)
        sq_err += float((err.double() ** 2).sum())
        sq_norm += float((x.double() ** 2).sum())
        sum_x += x.double().sum(dim=0).cpu()
        codes.append(SparseCode(code.indices.cpu(), code.values.cpu()))
    seconds = time.perf_counter() - start
    total = sq_norm - float(sum_x @ sum_x) / max(n, 1)  # sum ||x - mean||^2
    result = SparseCode.cat(codes)
    summary = {"tokens": n, "fvu": sq_err / total, "l0": float(result.l0().double().mean()),
               "tokens_per_s": n / seconds}
    result.save(cfg.out, metadata={"method": cfg.method, "sae": str(cfg.sae),
                                   "activations": str(store.path), "k": str(cfg.k),
                                   **{key: repr(v) for key, v in summary.items()}})
    return summary


def coded_batches(store: ActivationStore, coder: Coder, n: int, batch_size: int, device: str,
                  desc: str) -> Iterator[tuple[Tensor, SparseCode]]:
    """(rows, their code) for the store's first n rows, batch by batch, with a progress bar."""
    with tqdm(total=n, unit="tok", desc=desc, disable=None) as bar:
        for i in range(0, n, batch_size):
            x = store[i:min(i + batch_size, n)].to(device, torch.float32)
            yield x, coder(x)
            bar.update(len(x))


def _check_pair(sae: SAE, store: ActivationStore, cfg: DecomposeConfig) -> None:
    check_sae_matches_store(sae, store)
    if cfg.method == "encoder-scaled" and cfg.scale is None and len(store) <= cfg.fit_tokens:
        raise SaelabError("too few rows to hold some out for the scale fit",
                          expected=f"more than --fit-tokens={cfg.fit_tokens} rows",
                          found=f"{len(store)} rows", fix="lower --fit-tokens or pass --scale")


def check_sae_matches_store(sae: SAE, store: ActivationStore) -> None:
    """The SAE reads the store's width (an error otherwise); a warning if it was trained at
    another site."""
    if sae.d_model != store.d_model:
        raise SaelabError("the SAE and the activations differ in width",
                          expected=f"activations of width {sae.d_model} (the SAE's d_model)",
                          found=f"{store.d_model} at {store.site} in {store.path}",
                          fix="use the store of the site the SAE was trained on")
    if sae.site and sae.site != store.site:
        log.warning("the SAE was trained at %s but the activations are from %s", sae.site,
                    store.site)


def _scale(cfg: DecomposeConfig, sae: SAE, store: ActivationStore) -> LatentScale:
    if cfg.scale is not None:
        return LatentScale.load(cfg.scale)
    held_out = store[len(store) - cfg.fit_tokens:].to(cfg.device, torch.float32)
    scale = fit_scale(sae, held_out)
    path = cfg.out.with_name(cfg.out.stem + ".scale.safetensors")
    scale.save(path)
    log.info("fitted a per-latent scale on %d held-out rows; saved to %s", len(held_out), path)
    return scale
