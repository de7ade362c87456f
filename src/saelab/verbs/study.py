"""`saelab study`: the ITO study, from a preset or a file (`saelab.study` does the work)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from saelab.config import Verb, say
from saelab.study import PRESETS, StudySpec, read_spec, run_study


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    out: Path
    """Study folder: study.json, activations/, dictionaries/, evals/, results.json, plots,
    report.html. Running the same command again resumes a killed study."""
    preset: Literal["embedded", "quick"] = "embedded"
    """embedded: Gemma 3 270M, blocks.6.hook_resid_post, 12 dictionaries of 4096 latents (relu
    and jumprelu at target L0 16/32/64, topk and batchtopk at k 16/32/64), every coder;
    quick: the same stages at toy sizes (two TopK SAEs of 512 latents), in minutes."""
    config: Path | None = None
    """A .json or .toml file naming the dictionaries (trained, or loaded with `sae = ...`),
    coders, k grid and token counts (StudySpec's fields); it replaces the preset."""
    partial: bool = False
    """Train and score nothing: gather the dictionaries scored so far into OUT/partial/
    (results.json, plots, report.html), e.g. beside a study still running."""


def spec_of(cfg: StudyConfig) -> StudySpec:
    return read_spec(cfg.config) if cfg.config is not None else PRESETS[cfg.preset]


def run(cfg: StudyConfig) -> dict[str, Any]:
    return run_study(spec_of(cfg), cfg.out, say=say, partial=cfg.partial)


def summary(results: dict[str, Any]) -> list[str]:
    lines = [f"{'dictionary':<16} {'coder':<22} {'L0':>6} {'FVU':>7} {'loss recovered':>24}"]
    lines += [f"{r['dictionary']:<16} {r['label']:<22} {r['l0']:>6.1f} {r['fvu']:>7.4f} "
              f"{r['loss_recovered']:>8.4f} [{r['intervals']['loss_recovered'][0]:.4f}, "
              f"{r['intervals']['loss_recovered'][1]:.4f}]"
              for r in results["rows"] if r["matched"]]
    for sentences in results["answers"].values():
        lines += sentences
    if "partial" in results:
        return [*lines, f"partial: {len(results['partial']['scored'])} dictionaries scored, "
                f"still to score: {', '.join(results['partial']['missing']) or 'none'}"]
    return [*lines, f"done in {results['seconds']['total']:.0f} s"]


VERB = Verb(StudyConfig, run, summary, "The ITO study: train (or load) a grid of dictionaries, "
            "score the encoder, its fixes and the pursuits on the same held-out tokens, with "
            "bootstrap intervals and paired differences; results.json, plots, report.html.")
