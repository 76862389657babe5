"""A/B reports: which recommender variant made users view, cart and buy more.

Public surface: `build_report` (capture + events -> `Report`), `analyse` (the
statistics on per-user columns, used by tests and other callers), `METRICS`.
"""

from abtest.report import METRICS, Report, analyse, build_report

__all__ = ["METRICS", "Report", "analyse", "build_report"]
