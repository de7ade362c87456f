"""dashboard.html: one card per latent from latents.json (inline SVG, no scripts, no
network), so a person can read what each latent responds to."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from saelab.io import atomic_write

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}.latent{border:1px solid #ddd;border-radius:6px;padding:0.6em 1em;margin:1em 0}
.latent h2{font-size:1.1em;margin:0.2em 0}.stats{color:#555;font-size:0.9em}
.cols{display:flex;gap:2em;flex-wrap:wrap}.ctx{font-family:ui-monospace,monospace;
font-size:0.85em;white-space:pre-wrap;margin:0.15em 0}.ctx span{border-radius:2px}
.ctx .top{outline:1px solid #c40}.ctx .uncoded{color:#999}.val{color:#777;display:inline-block;
width:5em}table{border-collapse:collapse;font-size:0.85em}td{padding:1px 6px}
td.num{text-align:right;color:#555}svg{display:block}"""


def write_dashboard(result: dict[str, Any], path: Path) -> Path:
    """Write the page for a `run_dashboard` result."""
    method = result["method"] + (f" k={result['k']}" if result["k"] else "")
    intro = (f"{len(result['latents'])} of {result['n_latents']} latents "
             f"({result['firing_latents']} fire on these tokens), coded by {method} on the "
             f"first {result['tokens']} rows of {result['activations']} ({result['model']}, "
             f"{result['site']}). Shading: the latent's activation on each token, relative "
             f"to its largest; outlined: the token the context is ranked by; grey: not "
             f"coded. Logit effect: W_U d, the direct path through the unembedding only.")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>saelab dashboard: "
            f"{html.escape(result['site'])}</title><style>{_STYLE}</style></head><body>"
            f"<h1>Latents of {html.escape(str(result['sae']))}</h1><p>{html.escape(intro)}</p>"
            + "".join(_card(entry) for entry in result["latents"]) + "</body></html>")
    atomic_write(path, lambda f: f.write(page.encode()))
    return path


def _card(entry: dict[str, Any]) -> str:
    stats = (f"fires on {entry['frequency']:.3%} of tokens ({entry['fires']}); mean "
             f"{entry['mean_when_firing']:.4g} when firing; max |activation| "
             f"{entry['max_abs']:.4g}")
    contexts = "".join(_context(c, entry["max_abs"]) for c in entry["contexts"]) or \
        "<p class=\"stats\">never fires on the coded rows</p>"
    return (f"<div class=\"latent\" id=\"latent-{entry['latent']}\"><h2>latent "
            f"{entry['latent']}</h2><p class=\"stats\">{html.escape(stats)}</p>"
            f"<div class=\"cols\"><div>{_histogram(entry['histogram'])}</div>"
            f"{_logits(entry['logit_effect'])}</div><h3>Top contexts</h3>{contexts}</div>")


def _context(ctx: dict[str, Any], scale: float) -> str:
    spans = []
    for tok in ctx["tokens"]:
        text = html.escape(tok["text"]).replace("\n", "\u21b5")
        if tok["activation"] is None:
            spans.append(f"<span class=\"uncoded\">{text}</span>")
            continue
        alpha = min(abs(tok["activation"]) / scale, 1.0) if scale > 0 else 0.0
        colour = "255,120,0" if tok["activation"] >= 0 else "0,120,255"
        top = " class=\"top\"" if tok["top"] else ""
        spans.append(f"<span{top} style=\"background:rgba({colour},{alpha:.2f})\" "
                     f"title=\"{tok['activation']:.4g}\">{text}</span>")
    return (f"<p class=\"ctx\"><span class=\"val\">{ctx['activation']:.3g}</span>"
            + "".join(spans) + "</p>")


def _logits(effect: dict[str, list[dict[str, Any]]] | None) -> str:
    if effect is None:
        return "<div class=\"stats\">no logit effect (the site is off the residual stream)</div>"
    tables = []
    for side in ("promotes", "suppresses"):
        rows = "".join(f"<tr><td>{html.escape(repr(t['text']))}</td>"
                       f"<td class=\"num\">{t['effect']:+.3g}</td></tr>" for t in effect[side])
        tables.append(f"<div><b>{side}</b><table>{rows}</table></div>")
    return "".join(tables)


def _histogram(hist: dict[str, list]) -> str:
    """Bars of the activation histogram (when firing), as a small inline SVG."""
    counts, edges = hist["counts"], hist["edges"]
    if not counts:
        return ""
    w, h, top = 240, 80, max(counts)
    bar = w / len(counts)
    bars = "".join(f"<rect x=\"{i * bar:.1f}\" y=\"{h - h * c / top:.1f}\" "
                   f"width=\"{bar * 0.9:.1f}\" height=\"{h * c / top:.1f}\" fill=\"#c60\"/>"
                   for i, c in enumerate(counts))
    return (f"<svg width=\"{w}\" height=\"{h + 14}\" viewBox=\"0 0 {w} {h + 14}\">{bars}"
            f"<text x=\"0\" y=\"{h + 12}\" font-size=\"10\">{edges[0]:.3g}</text>"
            f"<text x=\"{w}\" y=\"{h + 12}\" font-size=\"10\" text-anchor=\"end\">"
            f"{edges[-1]:.3g}</text></svg><div class=\"stats\">activation when firing</div>")
