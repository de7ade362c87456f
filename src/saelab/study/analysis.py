"""A study's rows, the paired comparisons the published claim is about, and its answers.

The claim (Gated SAE paper, appendix A; GDM's 2024 progress update): at matched L0,
non-negative gradient pursuit on an SAE's decoder beats the encoder, the encoder's support
with re-fitted weights, and a learned rescale of the encoder's code, in loss recovered; and
decoders trained at a higher L0 do better under ITO even at a low test L0. Each ITO coder at
its dictionary's matched L0 is compared with each encoder-based coder on the same windows
(`comparisons`), every difference with its paired 95 % interval; a difference whose interval
holds 0 is "no difference shown", never a win.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saelab.coding import ENCODER_METHODS, PURSUIT_METHODS
from saelab.evals import METRICS, interval, load_columns, paired_difference, resample_counts
from saelab.io import to_json
from saelab.study.spec import StudySpec

COMPARED = ("fvu", "delta_loss", "kl", "loss_recovered")
BETTER = {"fvu": -1, "delta_loss": -1, "kl": -1, "loss_recovered": 1}  # the better direction


def gather(spec: StudySpec, evaluations: Mapping[str, dict[str, Any]],
           folders: Mapping[str, Path], training: Mapping[str, dict[str, Any]],
           curves: Mapping[str, Mapping[int, Path]] | None = None) -> dict[str, Any]:
    """The study's results.json (less its timings) from each dictionary's comparison, and
    (`curves`: per trained dictionary, training tokens -> the comparison folder of its
    encoder at that point) the training curves."""
    dictionaries, rows, comparisons = {}, [], []
    for entry in spec.dictionaries:
        ev = evaluations[entry.name]
        outcome = training[entry.name]
        training_l0 = entry.target_l0 if entry.target_l0 is not None else \
            entry.options.get("k", ev["encoder_l0"])
        dictionaries[entry.name] = {
            "architecture": ev["architecture"], "training_l0": training_l0,
            "encoder_l0": ev["encoder_l0"], "n_latents": ev["n_latents"], "sae": ev["sae"],
            "sparsity_coef": outcome.get("sparsity_coef"),
            "warnings": outcome.get("warnings", []), "final_training": outcome.get("final", {}),
            "matched_k": ev["matched_k"], "selection_cosine": ev["geometry"]["mean"],
            "principal": ev.get("principal", {}),
            "encoder_jaccard": _encoder_jaccard(ev["overlap"])}
        for r in ev["rows"]:
            rows.append({"dictionary": entry.name, "architecture": ev["architecture"],
                         "training_l0": training_l0,
                         "matched": r["k"] in (None, ev["matched_k"]), **r})
        comparisons += _comparisons(entry.name, ev, load_columns(folders[entry.name] /
                                                                 "windows.npz"))
    first = evaluations[spec.dictionaries[0].name]
    return {"spec": to_json(spec), "model": spec.model, "site": spec.site,
            "tokens": first["tokens"], "windows": first["windows"],
            "fit_tokens": first["fit_tokens"], "clean_loss": first["clean_loss"],
            "zero_ablation_loss": first["zero_ablation_loss"],
            "intervals": first["intervals"], "dictionaries": dictionaries, "rows": rows,
            "comparisons": comparisons,
            "curves": {name: training_curve(points) for name, points in (curves or {}).items()}}


CURVE_METRICS = ("fvu", "l0", "delta_loss", "kl", "loss_recovered")


def training_curve(points: Mapping[int, Path]) -> dict[str, Any]:
    """The encoder's metrics at each point of training, on the same windows (the fewest any
    point was scored on: the first ones), each with its interval; and the last step of the
    curve as a paired difference in delta loss (the finished dictionary minus the snapshot
    before it), which says whether the last stretch of training still helped."""
    columns = {t: load_columns(folder / "windows.npz")["encoder"]
               for t, folder in sorted(points.items())}
    n = min(len(c["tokens"]) for c in columns.values())
    columns = {t: {name: col[:n] for name, col in c.items()} for t, c in columns.items()}
    counts = resample_counts(n)
    out: list[dict[str, Any]] = []
    for tokens, cols in columns.items():
        ci = {m: interval(METRICS[m], cols, counts) for m in CURVE_METRICS}
        out.append({"tokens": tokens, **{m: i.value for m, i in ci.items()},
                    "intervals": {m: [i.low, i.high] for m, i in ci.items()}})
    curve: dict[str, Any] = {"windows": n, "points": out}
    if len(columns) > 1:
        (before, a), (after, b) = list(columns.items())[-2:]
        d = paired_difference(METRICS["delta_loss"], b, a, counts)
        curve["last_change"] = {"from_tokens": before, "to_tokens": after, **d.as_json(),
                                "excludes_zero": d.excludes_zero}
    return curve


def _comparisons(name: str, ev: dict[str, Any], columns: dict[str, dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Every ITO coder at the matched L0 against every encoder-based coder, paired."""
    k = ev["matched_k"]
    counts = resample_counts(ev["windows"])
    ito = [r for r in ev["rows"] if r["coder"] in PURSUIT_METHODS and r["k"] == k]
    base = [r for r in ev["rows"] if r["coder"] in ENCODER_METHODS]
    out = []
    for r in ito:
        for b in base:
            for metric in COMPARED:
                if r[metric] is None or b[metric] is None:
                    continue
                d = paired_difference(METRICS[metric], columns[r["label"]],
                                      columns[b["label"]], counts)
                out.append({"dictionary": name, "architecture": ev["architecture"],
                            "coder": r["name"], "against": b["name"], "metric": metric,
                            "k": k, **d.as_json(), "excludes_zero": d.excludes_zero,
                            "verdict": verdict(metric, d.value, d.excludes_zero)})
    return out


def _encoder_jaccard(overlap: dict[str, Any]) -> dict[str, float]:
    """Each matched-L0 coder's mean per-token Jaccard overlap with the encoder's support."""
    labels = overlap["labels"]
    if "encoder" not in labels:
        return {}
    row = overlap["jaccard"][labels.index("encoder")]
    return dict(zip(labels, row, strict=True))


def verdict(metric: str, difference: float, excludes_zero: bool) -> str:
    """`better`, `worse` or `no difference shown`, for coder minus baseline in `metric`."""
    if not excludes_zero:
        return "no difference shown"
    return "better" if difference * BETTER[metric] > 0 else "worse"


def answers(results: dict[str, Any]) -> dict[str, list[str]]:
    """The claim's parts in words, each sentence with its numbers."""
    return {"a": _part_a(results), "b": _part_b(results), "c": _part_c(results),
            "d": _part_d(results), "training": _part_training(results)}


def _part_training(results: dict[str, Any]) -> list[str]:
    """Whether each trained dictionary's own delta loss had stopped improving."""
    out = []
    for name, curve in results.get("curves", {}).items():
        pts = curve["points"]
        listing = ", ".join(f"{p['tokens']:,}: {p['delta_loss']:.4f}" for p in pts)
        line = (f"{name}: the encoder's delta loss against training tokens ({listing}; "
                f"{curve['windows']} windows)")
        change = curve.get("last_change")
        if change is not None:
            state = ("still falling" if change["high"] < 0 else "rising"
                     if change["low"] > 0 else "no change shown")
            line += (f"; from {change['from_tokens']:,} to {change['to_tokens']:,} tokens it "
                     f"changed by {change['value']:+.4f} [{change['low']:+.4f}, "
                     f"{change['high']:+.4f}] ({state})")
        out.append(line + ".")
    if not out:
        out.append("The study trained no dictionary, so it has no training curves.")
    return out


def _part_a(results: dict[str, Any]) -> list[str]:
    out = []
    headline = [c for c in results["comparisons"]
                if c["coder"] == "nn-gp" and c["metric"] == "loss_recovered"]
    by_dict: dict[str, list[dict[str, Any]]] = {}
    tally: dict[str, dict[str, int]] = {}
    for c in headline:
        by_dict.setdefault(c["dictionary"], []).append(c)
        t = tally.setdefault(c["against"], {"better": 0, "worse": 0, "no difference shown": 0})
        t[c["verdict"]] += 1
    for name, comps in by_dict.items():
        parts = [f"{c['against']} {c['value']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] "
                 f"({c['verdict']})" for c in comps]
        d = results["dictionaries"][name]
        out.append(f"{name} ({d['architecture']}, encoder L0 {d['encoder_l0']:.1f}, "
                   f"nn-gp at k={d['matched_k']}): loss recovered of nn-gp minus "
                   + "; ".join(parts) + ".")
    for against, t in tally.items():
        out.append(f"Against {against}, over {sum(t.values())} dictionaries: nn-gp better on "
                   f"{t['better']}, worse on {t['worse']}, no difference shown on "
                   f"{t['no difference shown']} (loss recovered, 95 % paired intervals).")
    cap = results["spec"]["max_matched_k"]
    for name, d in results["dictionaries"].items():
        if d["matched_k"] > cap:
            out.append(f"{name}: its encoder fires {d['encoder_l0']:.0f} latents per token, "
                       f"above max_matched_k {cap}, so it has no matched-L0 comparison.")
    if not out:
        out.append("The study has no nn-gp rows at matched L0, so part (a) is not answered.")
    return out


def _part_b(results: dict[str, Any]) -> list[str]:
    """Loss recovered under nn-gp at each test k against the dictionary's training L0,
    within each architecture."""
    out = []
    archs = dict.fromkeys(d["architecture"] for d in results["dictionaries"].values())
    for arch in archs:
        rows = [r for r in results["rows"] if r["architecture"] == arch
                and r["name"] == "nn-gp" and r["k"] is not None]
        trained = sorted({r["training_l0"] for r in rows})
        if len(trained) < 2:
            continue
        for k in sorted({r["k"] for r in rows}):
            at = {r["training_l0"]: r for r in rows if r["k"] == k}
            if len(at) < len(trained):
                continue
            values = [at[t]["loss_recovered"] for t in trained]
            trend = ("rises" if all(b > a for a, b in zip(values, values[1:], strict=False))
                     else "falls" if all(b < a for a, b in zip(values, values[1:],
                                                                strict=False))
                     else "is not monotonic")
            listing = ", ".join(f"trained at {t:g}: {at[t]['loss_recovered']:.4f} "
                                f"[{at[t]['intervals']['loss_recovered'][0]:.4f}, "
                                f"{at[t]['intervals']['loss_recovered'][1]:.4f}]"
                                for t in trained)
            out.append(f"{arch}, nn-gp at test k={k}: loss recovered {trend} with the "
                       f"training L0 ({listing}).")
    if not out:
        out.append("No architecture has nn-gp rows at two or more training L0s, so part "
                   "(b) is not answered.")
    return out


def _part_c(results: dict[str, Any]) -> list[str]:
    """The selection quirk (the cosine of each newly chosen latent to the span of those
    chosen before it; 0 is orthogonal) and the weight profile (the share of each code's
    weights below 10 % of its largest), per dictionary at its matched L0."""
    out = []
    for name, d in results["dictionaries"].items():
        listing = ", ".join(f"{label} {v:.3f}" for label, v in d["selection_cosine"].items())
        out.append(f"{name}: mean cosine of a newly chosen latent to the span of those "
                   f"already chosen: {listing}.")
    for name, d in results["dictionaries"].items():
        rows = {r["name"]: r for r in results["rows"] if r["dictionary"] == name
                and r["matched"]}
        listing = ", ".join(f"{n} {r['small_weight_fraction']:.1%}" for n, r in rows.items())
        out.append(f"{name} (L0 {d['encoder_l0']:.1f}): share of non-zero weights below 10 % "
                   f"of their code's largest: {listing}.")
    return out


def _part_d(results: dict[str, Any]) -> list[str]:
    """Why a lower FVU can cost more loss: each matched-L0 row's measured delta loss beside
    its first-order prediction g . (x_hat - x) (g the clean loss's gradient at the site), the
    share of its error in the activations' top principal directions, and its support's
    overlap with the encoder's."""
    out = []
    for name, d in results["dictionaries"].items():
        rows = [r for r in results["rows"] if r["dictionary"] == name and r["matched"]
                and r["delta_loss"] is not None]
        if not rows or rows[0].get("attributed_delta_loss") is None:
            continue
        m = d["principal"].get("directions")
        share = d["principal"].get("variance_share")
        listing = "; ".join(
            f"{r['name']}: FVU {r['fvu']:.4f}, delta loss {r['delta_loss']:.4f} (first order "
            f"{r['attributed_delta_loss']:+.4f}), error in the top {m} directions "
            f"{r['error_top_share']:.1%}"
            + (f", Jaccard with the encoder {d['encoder_jaccard'][r['label']]:.2f}"
               if r["label"] in d["encoder_jaccard"] else "") for r in rows)
        out.append(f"{name} (the top {m} principal directions hold {share:.1%} of the "
                   f"activations' variance): {listing}.")
    if not out:
        out.append("The study measured no first-order attributions, so part (d) is not "
                   "answered.")
    return out
