"""report.html: one self-contained page (inline SVG, no scripts, no network) that states the
comparison's answer in words, with the table and the plots."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from saelab.io import atomic_write
from saelab.reports.plots import PLOTS

PAGE_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;font-size:0.9em}td,th{padding:3px 9px;
border-bottom:1px solid #ddd;text-align:right}th{background:#f4f4f4}td:first-child,
th:first-child{text-align:left}tr.matched{background:#fff8e0}figure{display:inline-block;
margin:0.5em;width:520px;vertical-align:top}figure svg{width:100%;height:auto}
figcaption{font-size:0.85em;color:#555}.answer{font-size:1.05em;line-height:1.5}"""
_COLUMNS = [("label", "coder"), ("l0", "L0"), ("fvu", "FVU"), ("fvu_ci", "95 % CI"),
            ("cosine", "cosine"), ("delta_loss", "delta loss"), ("delta_loss_ci", "95 % CI"),
            ("loss_recovered", "loss recovered"), ("kl", "KL"), ("dead", "dead"),
            ("dense", "dense"), ("tokens_per_s", "tokens/s")]


def matched_rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows at the encoder's L0, by coder name (`gp`, `nn-gp`, `encoder`, ...)."""
    return {r["name"]: r for r in results["rows"] if r["k"] in (None, results["matched_k"])}


def with_interval(row: dict[str, Any], key: str, fmt: str) -> str:
    """`0.0725 [0.0701, 0.0750]`: a value and its 95 % interval."""
    low, high = row["intervals"][key]
    return f"{row[key]:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def answer(results: dict[str, Any]) -> list[str]:
    """The comparison's findings as sentences, each with its numbers and intervals."""
    rows = matched_rows(results)
    k = results["matched_k"]
    out = [f"On {results['tokens']} tokens ({results['windows']} windows) of "
           f"{results['model']} at {results['site']}, with the {results['n_latents']}-latent "
           f"{results['architecture']} SAE, whose encoder fires {results['encoder_l0']:.1f} "
           f"latents per token (pursuits matched at k={k}). Intervals are 95 % percentile "
           "bootstraps over windows."]
    for key, what, fmt in (("fvu", "FVU", ".4f"), ("delta_loss", "delta loss", ".4f")):
        ranked = sorted((r for r in rows.values() if r[key] is not None), key=lambda r: r[key])
        if not ranked:
            continue
        listing = ", ".join(f"{r['name']} {with_interval(r, key, fmt)}" for r in ranked)
        out.append(f"By {what} at that L0 the best coder is {ranked[0]['name']}; in order: "
                   f"{listing}.")
    for name, r in rows.items():
        diff = r.get("vs_encoder", {}).get("delta_loss")
        if diff is None:
            continue
        sign = "lower" if diff["value"] < 0 else "higher"
        verdict = "the interval excludes 0" if diff["excludes_zero"] else \
            "the interval includes 0: no difference shown"
        out.append(f"{name}'s delta loss minus the encoder's, on the same windows: "
                   f"{diff['value']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}] nats "
                   f"({sign}; {verdict}).")
    gp = rows.get("nn-gp", rows.get("gp"))
    if gp is not None:
        kept = results["overlap"]["encoder_top_kept"].get(gp["label"])
        if kept is not None:
            out.append(f"{gp['name']} keeps {kept:.0%} of the encoder's "
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
        + "".join(f"<td>{cell(_value(r, key))}</td>" for key, _ in _COLUMNS) + "</tr>"
        for r in results["rows"])
    figures = "".join(
        f"<figure>{inline_svg(out / f'{stem}.svg')}<figcaption>{html.escape(caption)}"
        f"</figcaption></figure>" for stem, caption in PLOTS.items()
        if (out / f"{stem}.svg").is_file())
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>saelab compare: "
            f"{html.escape(results['site'])}</title><style>{PAGE_STYLE}</style></head><body>"
            f"<h1>Encoder vs inference-time optimisation</h1><div class=\"answer\">"
            + "".join(f"<p>{html.escape(s)}</p>" for s in answer(results))
            + f"</div><h2>Every coder, every L0</h2><p>Highlighted: the encoder's L0.</p>"
            f"<table><tr>{head}</tr>{body}</table><h2>Plots</h2>{figures}</body></html>")
    path = out / "report.html"
    atomic_write(path, lambda f: f.write(page.encode()))
    return path


def _value(row: dict[str, Any], key: str) -> Any:
    if key.endswith("_ci"):
        bounds = row["intervals"].get(key.removesuffix("_ci"))
        return "" if bounds is None else f"[{bounds[0]:.4g}, {bounds[1]:.4g}]"
    return row[key]


def cell(v: Any) -> str:
    """A table cell's text: floats to 4 significant digits, large ones with separators;
    nothing for a value not measured (None)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return html.escape(str(v))


def inline_svg(path: Path) -> str:
    """An SVG file's <svg> element, to inline in a page."""
    text = path.read_text()
    return text[text.index("<svg"):]
