"""`fastclr report`: one self-contained HTML page (SVG charts, embedded PNGs, no network)."""

from fastclr.report.build import build_report

__all__ = ["build_report"]
