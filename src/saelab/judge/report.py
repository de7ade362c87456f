"""`saelab judge report` and `export`: the answers unblinded, and what they say.

- rate: each latent's mean score (Yes 2, Maybe 1, No 0) under each coder, over its raters;
  per coder the mean over latents with a 90 % BCa interval; the paired difference (second
  coder minus first, by latent) with the one-sided Wilcoxon-Pratt test and a 90 % BCa
  interval on its mean, as the Gated SAE paper reports it.
- pair: the share of answers preferring each coder, ties counted apart, with exact
  (Clopper-Pearson) 95 % intervals on the share of decided answers, overall and by the
  rater's confidence.
- intruder: accuracy per coder with exact intervals and its one-sided p against chance (1/5).
- per rater: the same, rater by rater; agreement (Krippendorff's alpha: ordinal for the
  ratings, nominal for the pair and intruder choices) on the trials more than one rater
  answered; the power line: how many answers a given effect would need.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saelab.io import atomic_write, write_json
from saelab.judge.db import DATABASE, StudyDB
from saelab.judge.stats import (
    answers_needed,
    bca_interval,
    binomial_interval,
    binomial_tail,
    krippendorff_alpha,
    share_answers_needed,
    wilcoxon_pratt,
)

LEVEL = 0.9  # the Gated paper's BCa level
CHANCE = 0.2  # the intruder among five
RATE_EFFECT = 0.25  # the power line: a quarter of a point on the 0-2 scale
PAIR_SHARE = 0.6  # and a 60:40 preference


@dataclass(frozen=True, kw_only=True)
class JudgeReportConfig:
    POSITIONAL = ("study",)
    study: Path
    """Study folder made by `saelab judge new`."""
    out: Path
    """Folder for results.json, the plots and report.html."""


@dataclass(frozen=True, kw_only=True)
class JudgeExportConfig:
    POSITIONAL = ("study",)
    study: Path
    """Study folder made by `saelab judge new`."""
    out: Path | None = None
    """Folder for answers.csv and answers.json (default: the study folder)."""


def judge_results(study: Path) -> dict[str, Any]:
    """Every statistic of the study's answers so far."""
    db = StudyDB(study / DATABASE)
    try:
        meta, answers = db.meta(), db.unblinded()
    finally:
        db.close()
    first, second = meta["coders"]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in answers:
        by_task[a["task"]].append(a)
    raters = sorted({a["rater"] for a in answers})
    return {"study": str(study), "coders": [first, second], "model": meta.get("model"),
            "site": meta.get("site"), "sae": meta.get("sae"), "k": meta.get("k"),
            "answers": len(answers), "raters": raters,
            "rate": _rate(by_task["rate"], first, second),
            "pair": _pair(by_task["pair"], first, second),
            "intruder": _intruder(by_task["intruder"], (first, second)),
            "per_rater": {r: {"rate": _rate([a for a in by_task["rate"] if a["rater"] == r],
                                            first, second, tests=False),
                              "pair": _pair([a for a in by_task["pair"] if a["rater"] == r],
                                            first, second),
                              "intruder": _intruder([a for a in by_task["intruder"]
                                                     if a["rater"] == r], (first, second))}
                          for r in raters},
            "agreement": _agreement(answers, raters, (first, second))}


def _rate(answers: list[dict[str, Any]], first: str, second: str, tests: bool = True
          ) -> dict[str, Any]:
    scores: dict[str, dict[int, list[float]]] = {first: defaultdict(list),
                                                 second: defaultdict(list)}
    for a in answers:
        scores[a["key"]["coder"]][a["key"]["latent"]].append(float(a["answer"]["score"]))
    out: dict[str, Any] = {"answers": len(answers), "coders": {}}
    for coder, per_latent in scores.items():
        means = np.array([np.mean(v) for v in per_latent.values()])
        entry: dict[str, Any] = {"latents": len(means),
                                 "mean": float(means.mean()) if len(means) else None}
        if tests and len(means) > 1:
            entry["interval"] = bca_interval(means, lambda r: r.mean(axis=-1),
                                                            level=LEVEL).as_json()
        out["coders"][coder] = entry
    both = sorted(set(scores[first]) & set(scores[second]))
    d = np.array([np.mean(scores[second][i]) - np.mean(scores[first][i]) for i in both])
    paired: dict[str, Any] = {"latents": len(both), "of": f"{second} minus {first}",
                              "mean": float(d.mean()) if len(d) else None}
    if tests and len(d) > 1:
        test = wilcoxon_pratt(d)
        spread = float(d.std(ddof=1))
        paired |= {"interval": bca_interval(d, lambda r: r.mean(axis=-1),
                                                           level=LEVEL).as_json(),
                   "wilcoxon_pratt": {"statistic": test.statistic, "z": test.z,
                                      "p_value": test.p_value, "nonzero": test.nonzero,
                                      "alternative": f"{second} rated higher"},
                   "power": {"effect": RATE_EFFECT, "spread": spread,
                             "latents_needed": answers_needed(RATE_EFFECT, spread),
                             "latents_now": len(d)}}
    out["paired"] = paired
    return out


def _preferred(a: dict[str, Any]) -> str | None:
    """The coder an answer to a pair trial prefers (None: no difference)."""
    choice = a["answer"]["choice"]
    return None if choice == "same" else a["key"][choice]


def _pair(answers: list[dict[str, Any]], first: str, second: str) -> dict[str, Any]:
    def shares(subset: Iterable[dict[str, Any]]) -> dict[str, Any]:
        chosen = [_preferred(a) for a in subset]
        wins, losses = chosen.count(second), chosen.count(first)
        decided = wins + losses
        return {"answers": len(chosen), f"prefer {second}": wins, f"prefer {first}": losses,
                "no difference": chosen.count(None),
                "share_preferring_second": binomial_interval(wins, decided).as_json()
                if decided else None}
    out = shares(answers)
    out["by_confidence"] = {str(c): shares(a for a in answers
                                           if a["answer"].get("confidence") == c)
                            for c in sorted({a["answer"].get("confidence") for a in answers}
                                            - {None})}
    out["power"] = {"share": PAIR_SHARE, "decided_needed": share_answers_needed(PAIR_SHARE)}
    return out


def _intruder(answers: list[dict[str, Any]], coders: tuple[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"answers": len(answers), "chance": CHANCE, "coders": {}}
    for coder in coders:
        mine = [a for a in answers if a["key"]["coder"] == coder]
        right = sum(a["answer"]["choice"] == a["key"]["intruder"] for a in mine)
        out["coders"][coder] = {
            "answers": len(mine), "correct": right,
            "accuracy": binomial_interval(right, len(mine)).as_json() if mine else None,
            "p_value_vs_chance": binomial_tail(right, len(mine), CHANCE) if mine else None}
    return out


def _agreement(answers: list[dict[str, Any]], raters: list[str], coders: tuple[str, str]
               ) -> dict[str, Any]:
    """Krippendorff's alpha per task over trials answered by two raters or more."""
    out: dict[str, Any] = {}
    for task, metric in (("rate", "ordinal"), ("pair", "nominal"), ("intruder", "nominal")):
        values: dict[int, dict[str, float]] = defaultdict(dict)
        for a in answers:
            if a["task"] == task:
                values[a["trial"]][a["rater"]] = _coded(task, a, coders)
        shared = [t for t, v in values.items() if len(v) > 1]
        if not shared:
            out[task] = {"trials": 0, "alpha": None}
            continue
        matrix = np.array([[values[t].get(r, math.nan) for t in shared] for r in raters])
        out[task] = {"trials": len(shared), "metric": metric,
                     "alpha": krippendorff_alpha(matrix, metric)}  # type: ignore[arg-type]
    return out


def _coded(task: str, a: dict[str, Any], coders: tuple[str, str]) -> float:
    """An answer as a number for the agreement: the score; the coder preferred (0 or 1; 2:
    no difference), so raters who saw the sides swapped still agree; the chosen position."""
    if task == "rate":
        return float(a["answer"]["score"])
    if task == "pair":
        chosen = _preferred(a)
        return 2.0 if chosen is None else float(coders.index(chosen))
    return float(a["answer"]["choice"])


EXPORT_COLUMNS = ("rater", "trial", "task", "coder", "latent", "row", "left", "right",
                  "intruder", "score", "choice", "confidence", "preferred", "explanation",
                  "given", "seconds")


def export_answers(cfg: JudgeExportConfig) -> dict[str, Any]:
    """answers.csv and answers.json: every live answer with its trial's key."""
    db = StudyDB(cfg.study / DATABASE)
    try:
        answers = db.unblinded()
    finally:
        db.close()
    out = cfg.out or cfg.study
    rows = []
    for a in answers:
        key, ans = a["key"], a["answer"]
        rows.append({"rater": a["rater"], "trial": a["trial"], "task": a["task"],
                     **{k: key.get(k) for k in ("coder", "latent", "row", "left", "right",
                                                "intruder")},
                     **{k: ans.get(k) for k in ("score", "choice", "confidence",
                                                "explanation")},
                     "preferred": _preferred(a) if a["task"] == "pair" else None,
                     "given": a["given"], "seconds": a["seconds"]})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "answers.csv", lambda f: f.write(buffer.getvalue().encode()))
    write_json(out / "answers.json", rows)
    return {"answers": len(rows), "out": str(out)}
