"""`saelab sites [MODEL]`: a model's sites, their widths and the modules behind them."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.config import Verb
from saelab.lm import EMBEDDED_MODEL, Site, load_model


@dataclass(frozen=True, kw_only=True)
class SitesConfig:
    POSITIONAL = ("model",)  # `saelab sites MODEL`, no flag
    model: str = EMBEDDED_MODEL
    """Model: gemma-3-270m, a .gguf file, a local Hugging Face folder, or a hub id."""
    layer: int | None = None
    """Only list the sites of this layer."""


@dataclass(frozen=True)
class Sites:
    model: str
    model_type: str
    sites: list[Site]


def run_sites(cfg: SitesConfig) -> Sites:
    lm = load_model(cfg.model)
    return Sites(cfg.model, lm.hf_model.config.model_type,
                 [s for s in lm.sites() if cfg.layer is None or s.layer == cfg.layer])


def sites_summary(result: Sites) -> list[str]:
    width = max((len(s.name) for s in result.sites), default=4)
    return [f"{result.model} ({result.model_type}): {len(result.sites)} sites",
            f"{'site':<{width}}  {'width':>6}  hugging face module",
            *(f"{s.name:<{width}}  {s.width:>6}  {s.module_path} ({s.side}put)"
              for s in result.sites)]


VERB = Verb(SitesConfig, run_sites, sites_summary, "List a model's sites with their widths.")
