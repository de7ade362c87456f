"""`saelab decompose`: code an activation store with an SAE's dictionary, report FVU and L0."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.activations import ActivationStore
from saelab.coding import Coder, LatentScale, SparseCode, fit_scale
from saelab.config import Verb
from saelab.errors import SaelabError
from saelab.evals import (
    CoderName,
    CoderSpec,
    ReconstructionMetrics,
    check_sae_fits_store,
    coded_batches,
)
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
    method: CoderName = "gp"
    """Coder: the SAE's encoder, its support refitted, its code rescaled, or matching /
    gradient / orthogonal matching pursuit; `nn-` first keeps latent activations >= 0 (the
    non-negative pursuits and NNLS refit: nn-gp, nn-encoder-refit, ...)."""
    k: int | None = None
    """Latents per token for mp, gp and omp."""
    tol: float | None = None
    """mp/gp/omp: also stop a token once its residual norm is below tol times its norm."""
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
    allow_mismatch: bool = False
    """Code the store even if the SAE was trained at another site or on another model."""


def run_decompose(cfg: DecomposeConfig) -> dict[str, Any]:
    """Code the store; write the codes; return FVU, mean L0, tokens and tokens/s."""
    store = ActivationStore(cfg.activations)
    # the store's norm scale serves SAEs trained on normalised inputs that lack their factor
    sae = load_sae(cfg.sae, device=cfg.device, input_scale=store.normalisation["norm_scale"])
    check_sae_fits_store(sae, store, allow_mismatch=cfg.allow_mismatch)
    n = min(cfg.tokens or len(store), len(store))
    scale = None
    if cfg.method == "encoder-scaled":
        scale = _scale(cfg, sae, store)
        if cfg.scale is None:
            n = min(n, len(store) - cfg.fit_tokens)
    spec = CoderSpec.named(cfg.method)
    coder = Coder(sae, spec.coder, k=cfg.k, tol=cfg.tol, nonnegative=spec.nonnegative,
                  scale=scale, bf16_screen=cfg.bf16_screen)
    metrics, codes = ReconstructionMetrics(), []
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    start = time.perf_counter()
    for x_BD, code in coded_batches(store, coder, n, cfg.batch_size, cfg.device, cfg.method):
        metrics.update(x_BD, code.decode(W_dec, b_dec), code)
        codes.append(SparseCode(code.indices.cpu(), code.values.cpu()))
    seconds = time.perf_counter() - start
    result = SparseCode.cat(codes)
    summary = {"method": cfg.method, "tokens": n, "fvu": metrics.fvu,
               "l0": float(result.l0().double().mean()), "tokens_per_s": n / seconds,
               "out": str(cfg.out)}
    result.save(cfg.out, metadata={"method": cfg.method, "sae": str(cfg.sae),
                                   "activations": str(store.path), "k": str(cfg.k),
                                   **{key: repr(summary[key]) for key in
                                      ("tokens", "fvu", "l0", "tokens_per_s")}})
    return summary


def decompose_summary(s: dict[str, Any]) -> list[str]:
    return [f"{s['method']}: {s['tokens']} tokens, FVU {s['fvu']:.4f}, L0 {s['l0']:.2f}, "
            f"{s['tokens_per_s']:.0f} tokens/s -> {s['out']}"]


def _scale(cfg: DecomposeConfig, sae: SAE, store: ActivationStore) -> LatentScale:
    if cfg.scale is not None:
        return LatentScale.load(cfg.scale)
    if len(store) <= cfg.fit_tokens:
        raise SaelabError("too few rows to hold some out for the scale fit",
                          expected=f"more than --fit-tokens={cfg.fit_tokens} rows",
                          found=f"{len(store)} rows", fix="lower --fit-tokens or pass --scale")
    held_out = store[len(store) - cfg.fit_tokens:].to(cfg.device, torch.float32)
    scale = fit_scale(sae, held_out)
    path = cfg.out.with_name(cfg.out.stem + ".scale.safetensors")
    scale.save(path)
    log.info("fitted a per-latent scale on %d held-out rows; saved to %s", len(held_out), path)
    return scale


VERB = Verb(DecomposeConfig, run_decompose, decompose_summary, "Code stored activations with "
            "an SAE's dictionary (encoder or inference-time optimisation); print FVU and L0.")
