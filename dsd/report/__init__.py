"""report.html for a set of evaluated runs (written by dsd-eval)."""

from dsd.report.html import write_report

__all__ = ["write_report"]
