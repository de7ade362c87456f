"""report.html: one self-contained page (inline SVG, no scripts, no network) that states the
comparison's answer in words, with the table and the plots."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from saelab.coding import ENCODER_METHODS
from saelab.io import atomic_write
from saelab.reports.plots import PLOTS

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;font-size:0.9em}td,th{padding:3px 9px;
border-bottom:1px solid #ddd;text-align:right}th{background:#f4f4f4}td:first-child,
th:first-child{text-align:left}tr.matched{background:#fff8e0}figure{display:inline-block;
margin:0.5em;width:520px;vertical-align:top}figure svg{width:100%;height:auto}
figcaption{font-size:0.85em;color:#555}.answer{font-size:1.05em;line-height:1.5}"""
_COLUMNS = [("label", "coder"), ("l0", "L0"), ("fvu", "FVU"), ("cosine", "cosine"),
            ("delta_loss", "delta loss"), ("loss_recovered", "loss recovered"),
            ("kl", "KL"), ("dead", "dead"), ("dense", "dense"),
            ("tokens_per_s", "tokens/s")]


def matched_rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows at the encoder's L0, by coder."""
    return {r["coder"]: r for r in results["rows"] if r["k"] in (None, results["matched_k"])}


def answer(results: dict[str, Any]) -> list[str]:
    """The comparison's findings as sentences, each with its numbers."""
    rows = matched_rows(results)
    k = results["matched_k"]
    out = [f"On {results['tokens']} tokens of {results['model']} at {results['site']}, with "
           f"the {results['n_latents']}-latent {results['architecture']} SAE, whose encoder "
           f"fires {results['encoder_l0']:.1f} latents per token (pursuits matched at k={k})."]
    for key, what, fmt in (("fvu", "FVU", ".4f"), ("delta_loss", "delta loss", ".4f")):
        ranked = sorted(rows.values(), key=lambda r: r[key])
        best = ranked[0]
        listing = ", ".join(f"{r['coder']} {r[key]:{fmt}}" for r in ranked)
        out.append(f"By {what} at that L0 the best coder is {best['coder']} "
                   f"({best[key]:{fmt}}); in order: {listing}.")
    if "gp" in rows:
        gp = rows["gp"]
        beaten = [c for c in ENCODER_METHODS if c in rows and gp["fvu"] < rows[c]["fvu"]]
        not_beaten = [c for c in ENCODER_METHODS if c in rows and c not in beaten]
        if beaten:
            gains = ", ".join(f"{c} by {1 - gp['fvu'] / rows[c]['fvu']:.1%}" for c in beaten)
            out.append(f"Gradient pursuit's FVU is lower than {gains}.")
        if not_beaten:
            out.append("Gradient pursuit does not beat " + ", ".join(not_beaten) +
                       " on FVU here.")
        kept = results["overlap"]["encoder_top_kept"].get(gp["label"])
        if kept is not None:
            out.append(f"Gradient pursuit keeps {kept:.0%} of the encoder's "
                       f"{results['overlap']['top_m']} largest latents per token.")
    means = results["geometry"]["mean"]
    if means:
        listing = ", ".join(f"{label} {v:.3f}" for label, v in means.items())
        out.append("Mean cosine of a newly chosen latent to the span of those already "
                   f"chosen (0 = orthogonal): {listing}.")
    out.append(f"Clean loss {results['clean_loss']:.4f} nats, zero ablation "
               f"{results['zero_ablation_loss']:.4f}; BOS positions are neither replaced "
               "nor scored.")
    return out



def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write `out/report.html` from results and the SVG plots already in `out`."""
    matched = {r["label"] for r in matched_rows(results).values()}
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in _COLUMNS)
    body = "".join(
        f"<tr class=\"{'matched' if r['label'] in matched else ''}\">"
        + "".join(f"<td>{_cell(r[key])}</td>" for key, _ in _COLUMNS) + "</tr>"
        for r in results["rows"])
    figures = "".join(
        f"<figure>{_inline_svg(out / f'{stem}.svg')}<figcaption>{html.escape(caption)}"
        f"</figcaption></figure>" for stem, caption in PLOTS.items()
        if (out / f"{stem}.svg").is_file())
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>saelab compare: "
            f"{html.escape(results['site'])}</title><style>{_STYLE}</style></head><body>"
            f"<h1>Encoder vs inference-time optimisation</h1><div class=\"answer\">"
            + "".join(f"<p>{html.escape(s)}</p>" for s in answer(results))
            + f"</div><h2>Every coder, every L0</h2><p>Highlighted: the encoder's L0.</p>"
            f"<table><tr>{head}</tr>{body}</table><h2>Plots</h2>{figures}</body></html>")
    path = out / "report.html"
    atomic_write(path, lambda f: f.write(page.encode()))
    return path


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return html.escape(str(v))


def _inline_svg(path: Path) -> str:
    text = path.read_text()
    return text[text.index("<svg"):]
