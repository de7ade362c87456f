"""A study's plots and report.html, from its results.json alone (see `saelab.study`)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from saelab.io import atomic_write  # noqa: E402
from saelab.reports.html import PAGE_STYLE, cell, inline_svg  # noqa: E402
from saelab.reports.plots import colour, save_figure  # noqa: E402

STUDY_PLOTS = {
    "study_delta_loss": "Delta loss against L0, one panel per architecture: each dictionary's "
                        "encoder (square) and its pursuits over k (nn-gp solid, gp dashed), "
                        "coloured by the dictionary's training L0; bars: 95 % intervals.",
    "study_training_l0": "Loss recovered under non-negative gradient pursuit against the "
                         "dictionary's training L0, one line per test k (the Gated paper's "
                         "figure 10); squares: each dictionary's encoder at its own L0.",
    "study_forest": "Paired differences in loss recovered at matched L0: nn-gp minus each "
                    "encoder-based coder, per dictionary, with 95 % intervals (right of 0: "
                    "nn-gp recovers more).",
    "study_curves": "Each trained dictionary's encoder, spliced in, against its training "
                    "tokens (snapshots of the run; the last point is the finished dictionary, "
                    "after its learning-rate decay), on the first held-out windows; bars: 95 % "
                    "intervals.",
}
PART_TITLES = {"a": "(a) Does non-negative gradient pursuit beat the encoder and its fixes "
                    "at matched L0?",
               "b": "(b) Decoders trained at higher L0, under ITO at a fixed test L0",
               "c": "(c) The selection quirk and the weight profile",
               "d": "(d) Why a lower FVU can cost more loss",
               "training": "Training tokens: had each dictionary stopped improving?"}


def write_study_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Draw `STUDY_PLOTS` into `out` (PNG and SVG); return the PNG paths."""
    archs = list(dict.fromkeys(d["architecture"] for d in results["dictionaries"].values()))
    drawers = {"study_delta_loss": (_delta_loss, archs),
               "study_training_l0": (_training_l0, archs), "study_forest": (_forest, ["all"])}
    trained = list(dict.fromkeys(results["dictionaries"][n]["architecture"]
                                 for n in results.get("curves", {})))
    if trained:
        drawers["study_curves"] = (_curves, trained)
    paths = []
    for stem, (draw, panel_archs) in drawers.items():
        panels = len(panel_archs)
        height = 4.2 if stem != "study_forest" else 1.2 + 0.32 * len(results["dictionaries"])
        fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels if panels > 1 else 7.5,
                                                     height), squeeze=False)
        draw(list(axes[0]), results, panel_archs)
        fig.suptitle(f"{results['model']} {results['site']}, {results['tokens']} tokens",
                     fontsize=10)
        paths.append(save_figure(fig, out / stem, dpi=110))
    return paths


def _errorbar(ax: Axes, rows: list[dict[str, Any]], x: str, y: str, **kw: Any) -> None:
    rows = [r for r in rows if r[y] is not None]
    if not rows:
        return
    xs = np.asarray([r[x] for r in rows], dtype=float)
    ys = np.asarray([r[y] for r in rows], dtype=float)
    lo = np.asarray([r["intervals"][y][0] for r in rows])
    hi = np.asarray([r["intervals"][y][1] for r in rows])
    bars = np.clip(np.stack([ys - lo, hi - ys]), 0, None)  # a percentile interval may miss
    ax.errorbar(xs, ys, yerr=bars, capsize=2, elinewidth=0.8, **kw)  # its point: stop there


def _colours(results: dict[str, Any], arch: str) -> dict[str, Any]:
    names = [n for n, d in results["dictionaries"].items() if d["architecture"] == arch]
    cmap = plt.get_cmap("viridis")
    return {n: cmap(i / max(1, len(names) - 1) * 0.85) for i, n in enumerate(names)}


def _delta_loss(axes: list[Axes], results: dict[str, Any], archs: list[str]) -> None:
    for ax, arch in zip(axes, archs, strict=True):
        for name, shade in _colours(results, arch).items():
            rows = [r for r in results["rows"] if r["dictionary"] == name]
            d = results["dictionaries"][name]
            encoder = [r for r in rows if r["name"] == "encoder"]
            if encoder:
                _errorbar(ax, encoder, "l0", "delta_loss", fmt="s", color=shade,
                          markeredgecolor="black", markersize=7,
                          label=f"{name} encoder (trained L0 {d['training_l0']:g})")
            for coder, style in (("nn-gp", "o-"), ("gp", "o--")):
                curve = sorted((r for r in rows if r["name"] == coder), key=lambda r: r["l0"])
                if curve:
                    _errorbar(ax, curve, "l0", "delta_loss", fmt=style, color=shade,
                              markersize=4, label=f"{name} {coder}")
        _finish(ax, arch, "L0", "delta loss (nats)")


def _training_l0(axes: list[Axes], results: dict[str, Any], archs: list[str]) -> None:
    ks = sorted({r["k"] for r in results["rows"] if r["name"] == "nn-gp" and r["k"]})
    cmap = plt.get_cmap("plasma")
    for ax, arch in zip(axes, archs, strict=True):
        rows = [r for r in results["rows"] if r["architecture"] == arch]
        for i, k in enumerate(ks):
            line = sorted((r for r in rows if r["name"] == "nn-gp" and r["k"] == k),
                          key=lambda r: r["training_l0"])
            if line:
                _errorbar(ax, line, "training_l0", "loss_recovered", fmt="o-",
                          color=cmap(i / max(1, len(ks) - 1) * 0.85), markersize=4,
                          label=f"nn-gp k={k}")
        encoder = sorted((r for r in rows if r["name"] == "encoder"),
                         key=lambda r: r["training_l0"])
        if encoder:
            _errorbar(ax, encoder, "training_l0", "loss_recovered", fmt="s", color="black",
                      markersize=6, label="encoder (own L0)")
        _finish(ax, arch, "training L0 of the dictionary", "loss recovered")


def _curves(axes: list[Axes], results: dict[str, Any], archs: list[str]) -> None:
    for ax, arch in zip(axes, archs, strict=True):
        for name, shade in _colours(results, arch).items():
            curve = results["curves"].get(name)
            if curve:
                _errorbar(ax, curve["points"], "tokens", "delta_loss", fmt="o-", color=shade,
                          markersize=4, label=name)
        _finish(ax, arch, "training tokens", "delta loss of the encoder (nats)")


def _finish(ax: Axes, arch: str, xlabel: str, ylabel: str) -> None:
    """One architecture's panel: L0 on a log2 axis, its labels, grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(arch, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)


def _forest(axes: list[Axes], results: dict[str, Any], archs: list[str]) -> None:
    ax = axes[0]
    comps = [c for c in results["comparisons"] if c["coder"] == "nn-gp"
             and c["metric"] == "loss_recovered"]
    names = list(dict.fromkeys(c["dictionary"] for c in comps))
    against = list(dict.fromkeys(c["against"] for c in comps))
    for j, base in enumerate(against):
        sel = [c for c in comps if c["against"] == base]
        y = np.asarray([names.index(c["dictionary"]) for c in sel]) + (j - len(against) / 2) * 0.15
        v = np.asarray([c["value"] for c in sel])
        err = np.stack([v - np.asarray([c["low"] for c in sel]),
                        np.asarray([c["high"] for c in sel]) - v])
        ax.errorbar(v, y, xerr=err, fmt="o", color=colour(base), capsize=2,
                    mfc="none" if base.startswith("nn-") else None,
                    markersize=4, label=f"nn-gp minus {base}")
    ax.axvline(0, color="#999999", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("difference in loss recovered (paired, 95 % interval)")
    ax.grid(alpha=0.3, axis="x")
    if comps:
        ax.legend(fontsize=7)


_TABLE = [("dictionary", "dictionary"), ("label", "coder"), ("l0", "L0"), ("fvu", "FVU"),
          ("delta_loss", "delta loss"), ("loss_recovered", "loss recovered"), ("kl", "KL"),
          ("small_weight_fraction", "weights < 10 % of max")]


def write_study_report(results: dict[str, Any], out: Path) -> Path:
    """`out/report.html`: the answers, the dictionaries, every row with its intervals, plots."""
    answers: dict[str, list[str]] = results.get("answers", {})
    parts = "".join(f"<h2>{html.escape(PART_TITLES.get(key) or key)}</h2>"
                    + "".join(f"<p>{html.escape(s)}</p>" for s in sentences)
                    for key, sentences in answers.items())
    dicts = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(d['architecture'])}</td>"
        f"<td>{cell(d['training_l0'])}</td><td>{cell(d['encoder_l0'])}</td>"
        f"<td>{cell(d['sparsity_coef']) if d['sparsity_coef'] is not None else ''}</td>"
        f"<td>{html.escape('; '.join(d['warnings']))}</td></tr>"
        for n, d in results["dictionaries"].items())
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in _TABLE)
    body = "".join(
        f"<tr class=\"{'matched' if r['matched'] else ''}\">" + "".join(
            f"<td>{_with_interval(r, key)}</td>" for key, _ in _TABLE) + "</tr>"
        for r in results["rows"])
    figures = "".join(
        f"<figure style=\"width:100%\">{inline_svg(out / f'{stem}.svg')}<figcaption>"
        f"{html.escape(caption)}</figcaption></figure>" for stem, caption in STUDY_PLOTS.items()
        if (out / f"{stem}.svg").is_file())
    seconds = results.get("seconds", {})
    partial = results.get("partial")
    when = (f"A partial report: {len(partial['scored'])} dictionaries scored so far; still "
            f"to score: {', '.join(partial['missing']) or 'none'}." if partial else
            f"Total time {seconds.get('total', float('nan')):.0f} s.")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>saelab study: "
            f"{html.escape(results['site'])}</title><style>{PAGE_STYLE}</style></head><body>"
            f"<h1>Encoder vs inference-time optimisation: the study</h1>"
            f"<p>{html.escape(results['model'])} at {html.escape(results['site'])}; "
            f"{results['tokens']} held-out tokens in {results['windows']} windows (clean loss "
            f"{results['clean_loss']:.4f}, zero ablation {results['zero_ablation_loss']:.4f}); "
            f"intervals: 95 % percentile bootstrap over windows, paired where two coders are "
            f"compared. {html.escape(when)}</p>{parts}"
            f"<h2>Dictionaries</h2><table><tr><th>name</th><th>architecture</th>"
            f"<th>training L0</th><th>encoder L0</th><th>sparsity coefficient</th>"
            f"<th>training warnings</th></tr>{dicts}</table>"
            f"<h2>Plots</h2>{figures}<h2>Every row</h2><p>Highlighted: matched L0.</p>"
            f"<table><tr>{head}</tr>{body}</table></body></html>")
    path = out / "report.html"
    atomic_write(path, lambda f: f.write(page.encode()))
    return path


def _with_interval(row: dict[str, Any], key: str) -> str:
    text = cell(row[key])
    if key in row["intervals"] and key != "l0":
        low, high = row["intervals"][key]
        text += f" <small>[{low:.4g}, {high:.4g}]</small>"
    return text
