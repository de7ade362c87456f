"""The comparison's plots, from results.json alone, each as PNG and SVG.

Reading only the results dictionary keeps plotting separate from computing: a plot can be
redrawn from an old run's results.json without the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PLOTS = {  # file stem -> what it shows (the report's captions)
    "pareto_fvu": "Fraction of variance unexplained against L0 (lower left is better).",
    "pareto_delta_loss": "Delta LM loss (spliced minus clean cross-entropy, nats) against L0.",
    "density": "How often each latent fires, at the encoder's L0 (log10 fraction of tokens).",
    "values": "Magnitudes of the non-zero latent activations, at the encoder's L0.",
    "overlap": "Mean per-token Jaccard overlap of the supports, at the encoder's L0.",
    "geometry": "Cosine between each newly chosen latent and the span of those chosen before "
                "it (pursuits: in selection order; encoder codes: by decreasing activation).",
}
_COLOURS = {"encoder": "#222222", "encoder-refit": "#8c564b", "encoder-scaled": "#e377c2",
            "mp": "#1f77b4", "gp": "#d62728", "omp": "#2ca02c"}


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Draw every plot of `PLOTS` into `out`; return the PNG paths."""
    drawers = {"pareto_fvu": lambda ax: _pareto(ax, results, "fvu", "FVU"),
               "pareto_delta_loss": lambda ax: _pareto(ax, results, "delta_loss",
                                                       "delta loss (nats)"),
               "density": lambda ax: _histograms(ax, results["density"]["log10_edges"],
                                                 results["density"]["histograms"],
                                                 "log10 fraction of tokens a latent fires on",
                                                 "latents"),
               "values": lambda ax: _histograms(ax, results["values"]["log10_abs_edges"],
                                                results["values"]["histograms"],
                                                "log10 |activation|", "non-zero activations"),
               "overlap": lambda ax: _overlap(ax, results["overlap"]),
               "geometry": lambda ax: _histograms(ax, results["geometry"]["edges"],
                                                  results["geometry"]["histograms"],
                                                  "cosine to the span of earlier choices",
                                                  "selections", density=True)}
    paths = []
    for stem, draw in drawers.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        draw(ax)
        ax.set_title(_title(stem, results), fontsize=10)
        paths.append(save_figure(fig, out / stem, dpi=120))
    return paths


def save_figure(fig: Figure, stem: Path, *, dpi: int, suffixes: tuple[str, ...] = ("png", "svg")
                ) -> Path:
    """Lay `fig` out, write it as STEM.png (and the other `suffixes`), each atomically (a
    temporary file renamed into place), close it; return the first file's path."""
    fig.tight_layout()
    for suffix in suffixes:
        path = stem.with_name(f"{stem.name}.{suffix}")
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=dpi, format=suffix)
        tmp.replace(path)
    plt.close(fig)
    return stem.with_name(f"{stem.name}.{suffixes[0]}")


def _title(stem: str, results: dict[str, Any]) -> str:
    where = f"{results['model']} {results['site']}, {results['n_latents']} latents"
    return {"pareto_fvu": "FVU vs L0", "pareto_delta_loss": "Delta loss vs L0",
            "density": "Latent density", "values": "Activation magnitudes",
            "overlap": "Support overlap", "geometry": "Selection geometry"}[stem] + f"\n{where}"


def colour(name: str) -> str | None:
    """A coder's colour, the same for its signed and non-negative variants (`nn-gp`)."""
    return _COLOURS.get(name.split(" ")[0].removeprefix("nn-"))


def _pareto(ax: Axes, results: dict[str, Any], key: str, label: str) -> None:
    both_signs = len({r["nonnegative"] for r in results["rows"] if r["k"] is not None}) > 1
    for name in dict.fromkeys(r["name"] for r in results["rows"]):
        rows = sorted((r for r in results["rows"] if r["name"] == name and r[key] is not None),
                      key=lambda r: r["l0"])
        if not rows:
            continue
        l0 = [r["l0"] for r in rows]
        y = np.asarray([r[key] for r in rows])
        low, high = (np.asarray([r["intervals"][key][i] for r in rows]) for i in (0, 1))
        dashed = both_signs and rows[0]["k"] is not None and not rows[0]["nonnegative"]
        style = ("o--" if dashed else "o-") if len(rows) > 1 else "s"
        # a percentile interval need not hold its point (a ratio over few windows): the bar
        # then stops at the point
        bars = np.clip(np.stack([y - low, high - y]), 0, None)
        ax.errorbar(l0, y, yerr=bars, fmt=style, color=colour(name),
                    label=name, markersize=5, capsize=2, elinewidth=0.8)
    ax.axvline(results["encoder_l0"], color="#999999", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    if key == "fvu" or all(r[key] is None or r[key] > 0 for r in results["rows"]):
        ax.set_yscale("log")
    ax.set_xlabel("L0 (mean non-zero latents per token)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _histograms(ax: Axes, edges: list[float], histograms: dict[str, list[int]],
                xlabel: str, ylabel: str, density: bool = False) -> None:
    edges_arr = np.asarray(edges)
    for label, counts in histograms.items():
        c = np.asarray(counts, dtype=float)
        if density and c.sum() > 0:
            c = c / c.sum()
        ax.stairs(c, edges_arr, label=label, color=colour(label), lw=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of " + ylabel if density else ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _overlap(ax: Axes, overlap: dict[str, Any]) -> None:
    labels, matrix = overlap["labels"], np.asarray(overlap["jaccard"])
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.6 else "black")
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
