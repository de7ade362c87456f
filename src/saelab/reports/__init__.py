"""Plots (PNG/SVG) and self-contained HTML pages, drawn from results files alone."""

from saelab.reports.dashboard import write_dashboard
from saelab.reports.html import answer, write_report
from saelab.reports.plots import PLOTS, write_plots

__all__ = ["PLOTS", "answer", "write_dashboard", "write_plots", "write_report"]
