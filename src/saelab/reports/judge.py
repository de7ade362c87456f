"""A judgement study's plot and report.html, from its results (`saelab.judge.report`)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from saelab.io import atomic_write  # noqa: E402
from saelab.reports.html import PAGE_STYLE, inline_svg  # noqa: E402
from saelab.reports.plots import colour, save_figure  # noqa: E402

JUDGE_PLOT = "judge"


def judge_sentences(results: dict[str, Any]) -> list[str]:
    """What the answers say, each sentence with its numbers."""
    first, second = results["coders"]
    out = [f"{results['answers']} answers from {len(results['raters'])} raters."]
    rate = results["rate"]
    paired = rate["paired"]
    for coder, entry in rate["coders"].items():
        if entry["mean"] is not None:
            ci = entry.get("interval")
            out.append(f"rate: {coder} scored {entry['mean']:.3f} on average over "
                       f"{entry['latents']} latents (0 No, 1 Maybe, 2 Yes)"
                       + (f", 90 % BCa [{ci['low']:.3f}, {ci['high']:.3f}]." if ci else "."))
    if "wilcoxon_pratt" in paired:
        w, ci, power = paired["wilcoxon_pratt"], paired["interval"], paired["power"]
        out.append(f"rate, paired by latent ({paired['latents']} latents): {second} minus "
                   f"{first} {paired['mean']:+.3f}, 90 % BCa [{ci['low']:+.3f}, "
                   f"{ci['high']:+.3f}]; one-sided Wilcoxon-Pratt p = {w['p_value']:.3g} "
                   f"({w['alternative']}). A difference of {power['effect']} points would "
                   f"need about {power['latents_needed']:.0f} latents at this spread for 80 % "
                   f"power (now {power['latents_now']}).")
    pair = results["pair"]
    if pair["answers"]:
        share = pair["share_preferring_second"]
        out.append(f"pair: {pair[f'prefer {second}']} answers preferred {second}, "
                   f"{pair[f'prefer {first}']} {first}, {pair['no difference']} saw no "
                   "difference" + (f"; {second}'s share of the decided ones "
                                   f"{share['value']:.3f}, 95 % exact [{share['low']:.3f}, "
                                   f"{share['high']:.3f}]" if share else "")
                   + f". A 60:40 preference needs about {pair['power']['decided_needed']:.0f} "
                   "decided answers for 80 % power.")
    for coder, entry in results["intruder"]["coders"].items():
        if entry["accuracy"]:
            acc = entry["accuracy"]
            out.append(f"intruder: under {coder}, {entry['correct']} of {entry['answers']} "
                       f"found ({acc['value']:.3f}, 95 % exact [{acc['low']:.3f}, "
                       f"{acc['high']:.3f}]; chance 0.2, one-sided p = "
                       f"{entry['p_value_vs_chance']:.3g}).")
    for task, entry in results["agreement"].items():
        if entry["alpha"] is not None:
            out.append(f"agreement ({task}, {entry['trials']} trials with two or more "
                       f"raters): Krippendorff's alpha {entry['alpha']:.3f} ({entry['metric']}).")
    return out


def write_judge_report(results: dict[str, Any], out: Path) -> Path:
    """`out/judge.png|svg` (the three tasks per coder) and `out/report.html`."""
    coders = results["coders"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    rate = results["rate"]["coders"]
    for i, coder in enumerate(coders):
        entry = rate.get(coder, {})
        if entry.get("mean") is not None:
            ci = entry.get("interval") or {"low": entry["mean"], "high": entry["mean"]}
            axes[0].errorbar([i], [entry["mean"]], yerr=[[max(0, entry["mean"] - ci["low"])],
                                                         [max(0, ci["high"] - entry["mean"])]],
                             fmt="o", color=colour(coder), capsize=3)
    axes[0].set(xticks=range(2), xticklabels=coders, ylim=(0, 2),
                ylabel="mean rating (90 % BCa)", title="rate")
    pair = results["pair"]
    counts = [pair.get(f"prefer {coders[0]}", 0), pair.get("no difference", 0),
              pair.get(f"prefer {coders[1]}", 0)]
    axes[1].bar(range(3), counts, color=[colour(coders[0]) or "C0", "#bbbbbb",
                                         colour(coders[1]) or "C1"])
    axes[1].set(xticks=range(3), xticklabels=[coders[0], "no difference", coders[1]],
                ylabel="answers", title="pair: which explains the token better")
    intruder = results["intruder"]["coders"]
    for i, coder in enumerate(coders):
        acc = intruder.get(coder, {}).get("accuracy")
        if acc:
            axes[2].errorbar([i], [acc["value"]], yerr=[[acc["value"] - acc["low"]],
                                                        [acc["high"] - acc["value"]]],
                             fmt="o", color=colour(coder), capsize=3)
    axes[2].axhline(results["intruder"]["chance"], color="#999999", lw=0.8, ls="--")
    axes[2].set(xticks=range(2), xticklabels=coders, ylim=(0, 1),
                ylabel="accuracy (95 % exact)", title="intruder")
    save_figure(fig, out / JUDGE_PLOT, dpi=110)
    lines = "".join(f"<p>{html.escape(s)}</p>" for s in judge_sentences(results))
    raters = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{r['rate']['answers']}</td>"
        f"<td>{r['pair']['answers']}</td><td>{r['intruder']['answers']}</td></tr>"
        for name, r in results["per_rater"].items())
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>saelab judge: "
            f"{html.escape(' vs '.join(coders))}</title><style>{PAGE_STYLE}</style></head>"
            f"<body><h1>Blind judgement: {html.escape(coders[0])} against "
            f"{html.escape(coders[1])}</h1><p>{html.escape(str(results.get('sae')))} at "
            f"{html.escape(str(results.get('site')))} of {html.escape(str(results.get('model')))}"
            f"</p>{lines}<figure style=\"width:100%\">{inline_svg(out / f'{JUDGE_PLOT}.svg')}"
            f"</figure><h2>Raters</h2><table><tr><th>rater</th><th>rate</th><th>pair</th>"
            f"<th>intruder</th></tr>{raters}</table></body></html>")
    path = out / "report.html"
    atomic_write(path, lambda f: f.write(page.encode()))
    return path
