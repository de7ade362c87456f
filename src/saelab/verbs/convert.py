"""`saelab convert SRC --to FORMAT --out DIR`: rewrite an SAE in another library's layout,
then load the result back and check it computes what the source does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.config import Verb
from saelab.formats import WritableFormat, load_sae, locate, write_sae
from saelab.saes import SAE


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    POSITIONAL = ("src",)  # `saelab convert SRC`, no flag
    src: str
    """The SAE to convert: a folder or file in any layout saelab reads, hf://OWNER/REPO/PATH,
    or RELEASE:SAE_ID (a SAELens release)."""
    to: WritableFormat = "saelens"
    """Layout to write: saelens (saelab's own), sparsify (TopK SAEs only) or
    dictionary_learning."""
    out: Path
    """Folder to write into (sparsify: OUT/HOOKPOINT, as its runs are laid out)."""


def run_convert(cfg: ConvertConfig) -> list[str]:
    found = locate(cfg.src)
    sae = load_sae(found.folder, input_scale=found.input_scale)
    folder = write_sae(sae, cfg.out, cfg.to)
    diff = max_difference(sae, load_sae(folder))
    return [f"{found.format} {sae.architecture} SAE ({sae.n_latents} latents, site "
            f"{sae.site}) -> {cfg.to} at {folder}",
            f"reloaded: codes and reconstructions within {diff:.1e} of the source's on 256 "
            "test inputs"]


@torch.no_grad()
def max_difference(a: SAE, b: SAE, n: int = 256, seed: int = 0) -> float:
    """Largest difference between two SAEs' codes or reconstructions, on inputs built from a's
    decoder (a few latents per row, sized to clear any threshold) so latents fire."""
    g = torch.Generator().manual_seed(seed)
    idx_BK = torch.randint(0, a.n_latents, (n, 8), generator=g)
    threshold = a.firing_threshold()
    size = 1.0 + 2 * float(threshold.detach().abs().max()) if threshold is not None else 1.0
    values_BK = size * (1 + torch.rand(n, 8, generator=g))
    x_BD = torch.einsum("bk,bkd->bd", values_BK, a.W_dec.detach().cpu()[idx_BK])
    x_BD = (x_BD + a.b_dec.detach().cpu()).to(a.W_dec)
    codes_a, codes_b = a.encode(x_BD), b.encode(x_BD.to(b.W_dec))
    return max(float((codes_a - codes_b.to(codes_a)).abs().max()),
               float((a.decode(codes_a) - b.decode(codes_b).to(codes_a)).abs().max()))


VERB = Verb(ConvertConfig, run_convert, lambda lines: lines, "Rewrite an SAE in another "
            "library's layout (saelens, sparsify, dictionary_learning) and check the result.")
