"""`saelab info SPEC`: what saelab finds at a spec: layout, architecture, width, site,
sparsity setting (k or thresholds) and file sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.config import Verb
from saelab.formats import load_sae, locate
from saelab.saes import SAE


@dataclass(frozen=True, kw_only=True)
class InfoConfig:
    POSITIONAL = ("spec",)  # `saelab info SPEC`, no flag
    spec: str
    """The SAE: a folder or file in any layout saelab reads, hf://OWNER/REPO/PATH, or
    RELEASE:SAE_ID (a SAELens release)."""


def run_info(cfg: InfoConfig) -> list[tuple[str, str]]:
    """(what, description) rows: layout, architecture, width, site, encoder, files."""
    found = locate(cfg.spec)
    sae = load_sae(found.folder, input_scale=found.input_scale)
    files = sorted(p for p in found.folder.iterdir() if p.is_file())
    return [("layout", f"{found.format} in {found.folder}"),
            ("architecture", f"{sae.architecture}; {sparsity(sae)}"),
            ("width", f"{sae.n_latents} latents x d_model {sae.d_model}"),
            ("site", f"{sae.site or 'unknown'} of {sae.model or 'an unnamed model'}"),
            ("encoder", "subtracts b_dec first" if sae.apply_b_dec_to_input
             else "encodes raw activations (no b_dec subtraction)"),
            ("files", ", ".join(f"{p.name} ({_size(p.stat().st_size)})" for p in files))]


def sparsity(sae: SAE) -> str:
    """How the SAE decides which latents fire: k, or its threshold(s)."""
    parts = [f"{name} {value}" for name, value in sae.hyperparameters().items()]
    threshold = sae.firing_threshold()
    if threshold is not None and threshold.numel() == 1:
        parts.append(f"threshold {float(threshold):.4g}")
    elif threshold is not None:
        q = torch.quantile(threshold.detach().float().cpu(), torch.tensor([0.0, 0.5, 1.0]))
        parts.append("thresholds min {:.4g}, median {:.4g}, max {:.4g}".format(*q.tolist()))
    return ", ".join(parts) or "ReLU (sparse through its L1 training)"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


VERB = Verb(InfoConfig, run_info, lambda rows: [f"{key:<14}{value}" for key, value in rows],
            "Show what an SAE is (any layout, local or on the hub): architecture, width, site, "
            "k or thresholds, file sizes.")
