"""Render a report document (see `result.build_doc`): the terminal summary
(`terminal`), charts (`svg`) and a self-contained HTML page (`html`), and JSON."""

from __future__ import annotations

from loadtest.report.common import HTML_NAME, JSON_NAME, clamp_notes, detail_lines
from loadtest.report.html import render_html, write_all, write_html, write_json
from loadtest.report.svg import svg_histogram, svg_percentile_curve, svg_throughput
from loadtest.report.terminal import print_summary

__all__ = [
    "HTML_NAME",
    "JSON_NAME",
    "clamp_notes",
    "detail_lines",
    "print_summary",
    "render_html",
    "svg_histogram",
    "svg_percentile_curve",
    "svg_throughput",
    "write_all",
    "write_html",
    "write_json",
]
