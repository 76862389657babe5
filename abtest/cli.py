"""`recsql ab-report`: which recommender variant made users buy more."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> int:
    """`24h`, `30m`/`30min`, `7d`, `900s` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a window like 24h, 30m, 7d or 900s")
    return round(float(match.group(1)) * _UNITS[match.group(2)])


def register(subparsers: argparse._SubParsersAction) -> None:
    from abtest.report import DEFAULT_METRIC, METRICS

    p = subparsers.add_parser(
        "ab-report",
        help="compare recommender variants: what users viewed, carted and bought after",
        description="Join each variant's captured recommendations (SageMaker data capture: "
        "DIR/<endpoint>/<variant>/YYYY/MM/DD/HH/*.jsonl) with what users did afterwards, "
        "and compare every variant with the control: shares of items shown that were later "
        "viewed, carted and bought within --window, purchases and revenue per user, with "
        "confidence intervals by user (delta method), a two-sided test (Bonferroni across "
        "variants) and a plain verdict.",
    )
    p.add_argument("events", nargs="*", type=Path, help="REES46 event .csv/.csv.gz files/folders")
    p.add_argument("--capture", type=Path, required=True, help="data-capture folder (DIR)")
    p.add_argument("--endpoint", help="the endpoint folder under DIR (needed if several)")
    p.add_argument("--events-db", type=Path, help="a DuckDB file holding the events table")
    p.add_argument("--events-url", help="mysql://user[:pw]@host[:port]/db holding the events")
    p.add_argument("--events-table", default="events", help="events table name (default events)")
    p.add_argument(
        "--window",
        type=parse_window,
        default=86400,
        help="how long after a recommendation an event counts (default 24h)",
    )
    p.add_argument(
        "--metric",
        choices=list(METRICS),
        default=DEFAULT_METRIC,
        help=f"the metric the verdict is on (default {DEFAULT_METRIC})",
    )
    p.add_argument("--control", help="the control variant (default AllTraffic, else first by name)")
    p.add_argument("--alpha", type=float, default=0.05, help="test level (default 0.05)")
    p.add_argument("--every", choices=("hour", "day"), help="plot period (default by time span)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", type=Path, help="write the metric per variant over time (.png)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from abtest.plot import plot_report
    from abtest.report import build_report
    from model.errors import DataError

    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise DataError(f"--plot {args.plot}: the picture is a PNG; name a .png file")
    report = build_report(
        args.capture,
        event_files=args.events,
        events_db=args.events_db,
        events_url=args.events_url,
        events_table=args.events_table,
        endpoint=args.endpoint,
        window_s=args.window,
        metric=args.metric,
        control=args.control,
        alpha=args.alpha,
        period=args.every,
    )
    if args.plot is not None:
        plot_report(report, args.plot)
    print(report.to_json() if args.json else report.to_table())
    return 0
