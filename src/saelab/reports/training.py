"""Training curves: FVU, L0, dead fraction and the sparsity coefficient against tokens, from
metrics.jsonl lines, for one run (`saelab train` draws its run folder's curves.png) or several
side by side (benchmarks/training_defaults.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from saelab.reports.plots import save_figure  # noqa: E402

PANELS = (("fvu", "FVU", "log"), ("l0", "L0", "log"), ("dead_fraction", "dead fraction",
                                                        "linear"),
          ("sparsity_coef", "sparsity coefficient", "linear"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl (a line cut short by a kill is dropped)."""
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return lines


def training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, *,
                    title: str = "", target_l0: float | None = None) -> Path:
    """Draw each run's metrics against tokens into the PNG `path` (written atomically)."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.0 * len(PANELS), 3.4))
    for ax, (key, label, scale) in zip(axes, PANELS, strict=True):
        for name, metrics in runs.items():
            points = [(m["tokens"], m[key]) for m in metrics if key in m]
            if points:
                ax.plot(*zip(*points, strict=True), label=name, linewidth=1.2)
        if key == "l0" and target_l0 is not None:
            ax.axhline(target_l0, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale(scale)
        ax.set_xlabel("training tokens")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path.with_suffix(""), dpi=110, suffixes=(path.suffix[1:],))
