"""The report of a run, rebuilt from OUT/evals.parquet and OUT/trials.parquet alone: measure (selection,
summaries, paired differences) → render (markdown, csv, tex, html) and plots → files (write_report,
compare). frontier holds the frontier math. Arrows run one way: files → render/plots → measure → frontier."""

from bench.report.files import REPORT_FILES, compare, write_report
from bench.report.measure import ReportError, load_run, saved_settings, summarize

__all__ = ["REPORT_FILES", "ReportError", "compare", "load_run", "saved_settings", "summarize", "write_report"]
