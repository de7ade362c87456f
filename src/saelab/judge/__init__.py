"""Blind judgement studies: encoder and ITO decompositions judged by people, without their
names (`saelab judge`). `build` freezes the trials, `db` keeps them and the answers, `server`
serves them to raters, `stats` and `report` say what the answers show."""

from saelab.judge.build import TASKS, JudgeNewConfig, new_study
from saelab.judge.db import DATABASE, StudyDB, Trial
from saelab.judge.report import (
    JudgeExportConfig,
    JudgeReportConfig,
    export_answers,
    judge_results,
)
from saelab.judge.server import JudgeServeConfig, create_app, serve

__all__ = ["DATABASE", "TASKS", "JudgeExportConfig", "JudgeNewConfig", "JudgeReportConfig",
           "JudgeServeConfig", "StudyDB", "Trial", "create_app", "export_answers",
           "judge_results", "new_study", "serve"]
