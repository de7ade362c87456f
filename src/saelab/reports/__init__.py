"""Plots (PNG/SVG) and self-contained HTML reports, drawn from results files."""

from saelab.reports.html import answer, write_report
from saelab.reports.plots import PLOTS, write_plots

__all__ = ["PLOTS", "answer", "write_plots", "write_report"]
