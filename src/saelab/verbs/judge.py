"""`saelab judge new | serve | report | export`: blind judgement studies of two coders on one
dictionary (`saelab.judge` does the work)."""

from __future__ import annotations

from typing import Any

from saelab.config import Verb
from saelab.io import write_json
from saelab.judge import (
    JudgeExportConfig,
    JudgeNewConfig,
    JudgeReportConfig,
    JudgeServeConfig,
    export_answers,
    judge_results,
    new_study,
    serve,
)
from saelab.reports import judge_sentences, write_judge_report


def _new_summary(result: dict[str, Any]) -> list[str]:
    if result["reused"]:
        return [f"the study is there already: {result['out']}"]
    counts = ", ".join(f"{n} {task}" for task, n in result["trials"].items())
    return [f"{counts} trials frozen from {result['tokens']} tokens (pursuit k={result['k']})"
            f" -> {result['out']}"]


def run_report(cfg: JudgeReportConfig) -> dict[str, Any]:
    results = judge_results(cfg.study)
    write_json(cfg.out / "results.json", results)
    write_judge_report(results, cfg.out)
    return {**results, "out": str(cfg.out / "report.html")}


def _report_summary(result: dict[str, Any]) -> list[str]:
    return [*judge_sentences(result), f"report: {result['out']}"]


NEW = Verb(JudgeNewConfig, new_study, _new_summary, "Freeze a blind judgement study of two "
           "coders on one SAE: rate, pair and intruder trials in study.db.")
SERVE = Verb(JudgeServeConfig, serve, lambda r: [f"stopped serving {r['study']}"],
             "Serve the study to raters in the browser (localhost by default; elsewhere "
             "with --token); every answer is committed as it is given.")
REPORT = Verb(JudgeReportConfig, run_report, _report_summary, "The answers so far, "
              "unblinded: ratings, preferences and intruder accuracy per coder with tests, "
              "intervals, agreement and a power line (results.json, report.html).")
EXPORT = Verb(JudgeExportConfig, export_answers,
              lambda r: [f"{r['answers']} answers -> {r['out']}/answers.csv, answers.json"],
              "Write every answer with its trial's key (answers.csv, answers.json).")
