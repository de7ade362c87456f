"""`saelab compare` and `saelab evaluate`: coders on one SAE's dictionary, on the same tokens
(`saelab.evals.comparison` does the work)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.config import Verb
from saelab.evals import CompareConfig, EvaluateConfig, compare
from saelab.reports import answer


@dataclass(frozen=True)
class Compared:
    results: dict[str, Any]
    out: Path
    seconds: float


def run_compare(cfg: CompareConfig | EvaluateConfig) -> Compared:
    start = time.perf_counter()
    return Compared(compare(cfg), cfg.out, time.perf_counter() - start)


def compare_summary(result: Compared) -> list[str]:
    lines = [f"{'coder':<22} {'L0':>7} {'FVU':>8} {'delta loss':>11} {'95 % CI':>18} "
             f"{'recovered':>10}"]
    lines += [f"{r['label']:<22} {r['l0']:>7.2f} {r['fvu']:>8.4f} {r['delta_loss']:>11.4f} "
              f"{_ci(r['intervals']['delta_loss']):>18} {r['loss_recovered']:>10.3f}"
              for r in result.results["rows"]]  # compare splices every row
    return [*lines, *answer(result.results),
            f"done in {result.seconds:.0f} s; report: {result.out / 'report.html'}"]


def _ci(bounds: list[float]) -> str:
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


COMPARE = Verb(CompareConfig, run_compare, compare_summary, "Every coder at every L0 on the "
               "same tokens: results.json, Pareto plots and a self-contained report.html.")
EVALUATE = Verb(EvaluateConfig, run_compare, compare_summary, "Score one coder on an SAE: FVU, "
                "L0, delta LM loss with reconstructions spliced in, dead and dense latents.")
