"""Join what each variant recommended with what users did next, and say which sold more.

Attribution: an item shown to a user at inference time t counts as viewed (carted,
bought) when that user has a view (cart, purchase) event of that product in
[t, t + window). REES46 events carry no "clicked a recommendation" flag, so this also
counts what the user would have done anyway; both variants are measured the same way, so
with random assignment the *difference* is the variant's effect, not the levels.

Per variant and user: items shown, requests, items later viewed / carted / bought (the
shares' numerators), and purchases: each purchase event of a recommended product counted
once per variant however often it was recommended, with its `price` summed as revenue.
A user served by several variants (SageMaker splits traffic per request, not per user,
unless the caller pins a variant) counts in each, for what each showed; the report says
how many such users there are.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from abtest.events import load_events
from abtest.recommendations import Recommendations, read_recommendations
from abtest.stats import FEW_USERS, Comparison, Estimate, compare, ratio_estimate
from model.errors import DataError

log = logging.getLogger(__name__)

# metric -> (numerator column, denominator column or None for "per user", label)
METRICS: dict[str, tuple[str, str | None, str]] = {
    "purchases_per_user": ("purchases", None, "purchases per user"),
    "revenue_per_user": ("revenue", None, "revenue per user"),
    "purchased_share": ("bought", "items", "share of items shown later bought"),
    "carted_share": ("carted", "items", "share of items shown later carted"),
    "viewed_share": ("viewed", "items", "share of items shown later viewed"),
}
DEFAULT_METRIC = "purchases_per_user"
_VERBS = {"viewed_share": "was viewed", "carted_share": "was carted"}  # else "sold"
USER_COLUMNS = ("items", "requests", "viewed", "carted", "bought", "purchases", "revenue")


@dataclass
class VariantResult:
    name: str
    users: int
    requests: int
    items: int
    purchases: int
    revenue: float | None  # None: no price known
    metrics: dict[str, Estimate]


@dataclass
class Report:
    metric: str
    control: str
    alpha: float
    window_s: int
    variants: list[VariantResult]
    comparisons: list[Comparison]
    verdict: str
    lines: list[str]  # one plain sentence per comparison
    skipped: dict[str, int] = field(default_factory=dict)
    shared_users: int = 0
    warnings: list[str] = field(default_factory=list)
    # variant -> [(period start ISO, estimate of the metric)] for the plot
    series: dict[str, list[tuple[str, Estimate]]] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["series"] = {
            v: [{"period": p, **asdict(e)} for p, e in points] for v, points in self.series.items()
        }
        return json.dumps(_finite(doc), indent=2)

    def to_table(self) -> str:
        return format_table(self)


def _finite(value: Any) -> Any:
    """NaN/inf (no users, no spread) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------------- the core


def analyse(
    users: dict[str, dict[str, np.ndarray]],
    metric: str = DEFAULT_METRIC,
    control: str | None = None,
    alpha: float = 0.05,
) -> tuple[dict[str, dict[str, Estimate]], list[Comparison], list[str], str]:
    """Per-user columns (USER_COLUMNS) of each variant -> every metric's estimate per
    variant, the comparisons on `metric`, one sentence each, and the verdict."""
    if metric not in METRICS:
        raise DataError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if not users:
        raise DataError("no variant has any recommendation to a known user")
    control = control if control is not None else default_control(list(users))
    if control not in users:
        raise DataError(f"no variant {control!r} to compare with; variants: {', '.join(users)}")
    estimates = {
        name: {
            key: ratio_estimate(cols[num], None if den is None else cols[den])
            for key, (num, den, _) in METRICS.items()
        }
        for name, cols in users.items()
    }
    primary = {name: e[metric] for name, e in estimates.items()}
    comparisons = compare(primary, control, alpha)
    lines = [_sentence(c, metric, primary) for c in comparisons]
    return estimates, comparisons, lines, _verdict(comparisons, lines, control)


def default_control(variants: list[str]) -> str:
    """AllTraffic (SageMaker's default variant name) when present, else the first by name."""
    return "AllTraffic" if "AllTraffic" in variants else sorted(variants)[0]


def _pct(x: float | None) -> str:
    return "?" if x is None or not math.isfinite(x) else f"{x * 100:+.1f}%"


def _sentence(c: Comparison, metric: str, primary: dict[str, Estimate]) -> str:
    label, verb = METRICS[metric][2], _VERBS.get(metric, "sold")
    level = f"{c.confidence * 100:.4g}%"
    p = f"p={c.p_value:.2g}" if math.isfinite(c.p_value) else "p=?"
    if c.lift is None:
        how = f"{c.difference:+.4g} {label} (the control's is 0), {p}"
    else:
        how = f"{_pct(c.lift)} {label} ({level} CI {_pct(c.ci_low)}..{_pct(c.ci_high)}), {p}"
    if c.significant:
        word = "more" if c.difference > 0 else "less"
        return f"variant {c.variant} {verb} {word} than {c.control}: {how}"
    users = f"{primary[c.control].users:,} and {primary[c.variant].users:,} users"
    tail = ""
    if c.detectable is not None and math.isfinite(c.detectable):
        tail = f"; with {users} a difference under {c.detectable * 100:.1f}% cannot be told apart"
    return f"no difference detected between {c.variant} and {c.control}: {how}{tail}"


def _verdict(comparisons: list[Comparison], lines: list[str], control: str) -> str:
    """The best variant that beat the control; else those that lost; else no difference."""
    if not comparisons:
        return f"only one variant ({control}): nothing to compare"
    pairs = list(zip(comparisons, lines, strict=True))
    better = [
        (c.difference if c.lift is None else c.lift, line)
        for c, line in pairs
        if c.significant and c.difference > 0
    ]
    if better:
        return max(better)[1]
    worse = [line for c, line in pairs if c.significant]
    if worse:
        return "; ".join(worse)
    return lines[0] if len(lines) == 1 else "no difference detected: " + "; ".join(lines)


# ---------------------------------------------------------------------- the join


def build_report(
    capture: Path,
    event_files: list[Path] | None = None,
    events_db: Path | None = None,
    events_url: str | None = None,
    events_table: str = "events",
    endpoint: str | None = None,
    window_s: int = 86400,
    metric: str = DEFAULT_METRIC,
    control: str | None = None,
    alpha: float = 0.05,
    period: str | None = None,
) -> Report:
    """The whole report: read the capture, load the events, join, analyse."""
    if metric not in METRICS:
        raise DataError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if not 0 < alpha < 1:
        raise DataError(f"--alpha must be between 0 and 1, not {alpha}")
    if window_s <= 0:
        raise DataError("--window must be positive")
    recs = read_recommendations(capture, endpoint)
    if not recs.variant:
        raise DataError(f"{capture}: no recommendation lists to a known user ({_skips(recs)})")
    names = sorted(set(recs.variant))
    if control is not None and control not in names:
        raise DataError(f"no variant {control!r} in the capture; variants: {', '.join(names)}")
    con = duckdb.connect()
    try:
        columns = recs.columns()
        first, last = int(columns["t_us"].min()), int(columns["t_us"].max())
        _load_recommendations(con, columns)
        has_price = load_events(
            con,
            first,
            last + window_s * 1_000_000,
            event_files or (),
            events_db,
            events_url,
            events_table,
        )
        _join(con, window_s)
        per_user = _per_user(con, None)
        period = period or _period(per_user, last - first)
        per_period = _per_user(con, period)
        shared = con.execute(
            "SELECT count(*) FROM"
            " (SELECT u FROM recs GROUP BY u HAVING count(DISTINCT variant) > 1)"
        ).fetchone()[0]
    finally:
        con.close()
    estimates, comparisons, lines, verdict = analyse(per_user, metric, control, alpha)
    variants = [
        VariantResult(
            name=name,
            users=len(cols["items"]),
            requests=int(cols["requests"].sum()),
            items=int(cols["items"].sum()),
            purchases=int(cols["purchases"].sum()),
            revenue=float(cols["revenue"].sum()) if has_price else None,
            metrics=estimates[name],
        )
        for name, cols in per_user.items()
    ]
    warnings = _warnings(variants, shared, has_price, metric)
    num, den, _ = METRICS[metric]
    series = {
        name: [
            (str(p), ratio_estimate(c[num], None if den is None else c[den]))
            for p, c in sorted(points.items())
        ]
        for name, points in _split_periods(per_period).items()
    }
    return Report(
        metric=metric,
        control=control or default_control(names),
        alpha=alpha,
        window_s=window_s,
        variants=variants,
        comparisons=comparisons,
        verdict=verdict,
        lines=lines,
        skipped={k: v for k, v in recs.counts.items() if k not in ("records", "lists")},
        shared_users=int(shared),
        warnings=warnings,
        series=series,
    )


def _period(per_user: dict[Any, dict[str, np.ndarray]], span_us: int) -> str:
    """Hours when a variant has enough users an hour for a readable band, else days."""
    users = min(len(cols["items"]) for cols in per_user.values())
    hours = span_us / 3.6e9 + 1
    return "hour" if users / hours >= FEW_USERS else "day"


def _skips(recs: Recommendations) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(recs.counts.items())) or "nothing read"


def _warnings(
    variants: list[VariantResult], shared: int, has_price: bool, metric: str
) -> list[str]:
    found = []
    few = [v.name for v in variants if v.users < FEW_USERS]
    if few:
        found.append(f"fewer than {FEW_USERS} users in {', '.join(few)}: the intervals are rough")
    if shared:
        found.append(
            f"{shared:,} users were served by more than one variant (counted in each); pin "
            "users to a variant (TargetVariant) for a cleaner test"
        )
    if not has_price and metric == "revenue_per_user":
        found.append("the events have no price column: revenue is 0 everywhere")
    return found


def _load_recommendations(con: duckdb.DuckDBPyConnection, columns: dict[str, np.ndarray]) -> None:
    """recs (one row per item shown) and pairs (the (user, product) pairs shown)."""
    con.register("recs_in", columns)
    con.execute(
        """CREATE TEMP TABLE recs AS
           SELECT row_number() OVER () AS rid, variant::VARCHAR AS variant, req,
                  make_timestamp(t_us) AS t, u, p FROM recs_in;
           CREATE TEMP TABLE pairs AS SELECT DISTINCT u, p FROM recs"""
    )
    con.unregister("recs_in")


def _join(con: duckdb.DuckDBPyConnection, window_s: int) -> None:
    """hits (what became of each item shown) and sold (purchases, each event once per
    variant, with the first recommendation that led to it)."""
    con.execute("CREATE TEMP TABLE evr AS SELECT row_number() OVER () AS eid, * FROM ev")
    within = "e.u = r.u AND e.p = r.p AND e.t >= r.t AND e.t < r.t + to_microseconds($w)"
    window = {"w": window_s * 1_000_000}
    con.execute(
        f"""CREATE TEMP TABLE hits AS
            SELECT r.rid, r.variant, r.req, r.t, r.u,
                   coalesce(bool_or(e.type = 'view'), false) AS viewed,
                   coalesce(bool_or(e.type = 'cart'), false) AS carted,
                   coalesce(bool_or(e.type = 'purchase'), false) AS bought
            FROM recs r LEFT JOIN evr e ON {within}
            GROUP BY r.rid, r.variant, r.req, r.t, r.u""",
        window,
    )
    con.execute(
        f"""CREATE TEMP TABLE sold AS
            SELECT r.variant, e.u, e.eid, any_value(e.price) AS price, min(r.t) AS first_t
            FROM recs r JOIN evr e ON e.type = 'purchase' AND {within}
            GROUP BY r.variant, e.u, e.eid""",
        window,
    )


def _per_user(
    con: duckdb.DuckDBPyConnection, period: str | None
) -> dict[Any, dict[str, np.ndarray]]:
    """variant (or (variant, period)) -> USER_COLUMNS arrays, one entry per user."""
    if period not in (None, "hour", "day"):
        raise DataError(f"--every must be hour or day, not {period!r}")
    shown_key = f", date_trunc('{period}', t) AS period" if period else ""
    sold_key = f", date_trunc('{period}', first_t) AS period" if period else ""
    keys = "variant" + (", period" if period else "") + ", u"  # one group's users together
    table = con.execute(
        f"""WITH shown AS (
                SELECT variant, u{shown_key}, count(*) AS items, count(DISTINCT req) AS requests,
                       count(*) FILTER (viewed) AS viewed, count(*) FILTER (carted) AS carted,
                       count(*) FILTER (bought) AS bought
                FROM hits GROUP BY ALL),
            buys AS (
                SELECT variant, u{sold_key}, count(*) AS purchases,
                       coalesce(sum(price), 0) AS revenue
                FROM sold GROUP BY ALL)
            SELECT {keys}, items, requests, viewed, carted, bought,
                   coalesce(purchases, 0) AS purchases, coalesce(revenue, 0.0) AS revenue
            FROM shown LEFT JOIN buys USING ({keys})
            ORDER BY {keys}"""
    ).fetchnumpy()
    groups = (
        list(zip(table["variant"], table["period"], strict=True))
        if period
        else list(table["variant"])
    )
    out: dict[Any, dict[str, np.ndarray]] = {}
    if not groups:
        return out
    bounds = [0] + [i for i in range(1, len(groups)) if groups[i] != groups[i - 1]] + [len(groups)]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        out[groups[start]] = {c: np.asarray(table[c][start:stop], np.float64) for c in USER_COLUMNS}
    return out


def _split_periods(
    per_period: dict[Any, dict[str, np.ndarray]],
) -> dict[str, dict[Any, dict[str, np.ndarray]]]:
    out: dict[str, dict[Any, dict[str, np.ndarray]]] = {}
    for (variant, period), cols in per_period.items():
        out.setdefault(variant, {})[period] = cols
    return out


# ------------------------------------------------------------------------ the table


def format_table(report: Report) -> str:
    label = METRICS[report.metric][2]
    hours = report.window_s / 3600
    window = f"{hours:g}h" if hours >= 1 else f"{report.window_s // 60}min"
    head = (
        f"A/B report: {len(report.variants)} variant(s), window {window} after each "
        f"recommendation, metric: {label}, control {report.control}, alpha {report.alpha:g}"
    )
    columns = ["variant", "users", "requests", "items", "viewed", "carted", "bought",
               "purchases", "purch/user", "revenue", "rev/user"]  # fmt: skip
    rows = [columns]
    for v in report.variants:
        m = v.metrics
        rows.append(
            [
                v.name,
                f"{v.users:,}",
                f"{v.requests:,}",
                f"{v.items:,}",
                _share(m["viewed_share"]),
                _share(m["carted_share"]),
                _share(m["purchased_share"]),
                f"{v.purchases:,}",
                _number(m["purchases_per_user"]),
                "-" if v.revenue is None else f"{v.revenue:,.2f}",
                "-" if v.revenue is None else _number(m["revenue_per_user"]),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    table = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )  # fmt: skip
        for row in rows
    ]
    out = [head, "", *table, ""]
    out += [f"  {line}" for line in report.lines]
    out += ["", f"verdict: {report.verdict}"]
    if report.skipped:
        out.append(
            "skipped: "
            + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in report.skipped.items())
        )
    out += [f"warning: {w}" for w in report.warnings]
    return "\n".join(out)


def _share(e: Estimate) -> str:
    return "-" if not math.isfinite(e.value) else f"{e.value * 100:.2f}%"


def _number(e: Estimate) -> str:
    return "-" if not math.isfinite(e.value) else f"{e.value:.4g}"
