"""Plots (PNG/SVG) and self-contained HTML pages, drawn from results files alone."""

from saelab.reports.dashboard import write_dashboard
from saelab.reports.html import answer, write_report
from saelab.reports.judge import judge_sentences, write_judge_report
from saelab.reports.plots import PLOTS, write_plots
from saelab.reports.study import STUDY_PLOTS, write_study_plots, write_study_report
from saelab.reports.training import read_metrics, training_curves

__all__ = ["PLOTS", "STUDY_PLOTS", "answer", "judge_sentences", "read_metrics",
           "training_curves", "write_dashboard", "write_judge_report", "write_plots",
           "write_report", "write_study_plots", "write_study_report"]
