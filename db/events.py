"""Fresh events from SQL and files: rows -> `{"events": [...]}` POSTs to an endpoint's store.

The server (serve/events.py) takes a request's events all or nothing: one bad entry is a
400 naming it, and nothing is stored. So that a bad row never costs the good rows beside
it, a batch the server rejects in part is split in halves and each half sent again, down
to single rows: every good row is taken, every bad row gets its own verdict and reason.
With b bad rows among n that is about 2*b*log2(n) more requests; none when all are good,
one when all are bad (the 400 says "K of N entries rejected").

A row's verdict: 1 taken, 0 rejected (a bad id, event type or time), None not sent (a
NULL user/session id or product id). NULL event_type is left out (the server reads a
view), NULL event_time too (the server stamps it now). A request with no usable answer
(endpoint down, timeout, a 5xx, 503 when the store is down, a 400 that is not about the
entries, such as fresh events being off) raises EndpointError: the caller decides.

Requests go one at a time, in row order: the store keeps each user's last N events in the
order taken, so a back-fill should come in event_time order (REES46 files are).

`push_events` is `recsql events push`: REES46 CSV files, a DuckDB query or a MySQL query
-> batches of `batch` events (default 500) with a progress bar.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from db.functions import EVENT_KEYS
from db.http import EndpointError, EndpointPool
from db.load import FILE_COLUMNS
from model.errors import BadRequest, RecsqlError, first_line

log = logging.getLogger(__name__)

DEFAULT_BATCH = 500
MAX_BATCH = 10_000
_REJECTED = re.compile(r"nothing taken, (\d+) of (\d+) entries rejected")

Entry = dict[str, Any]


# ----------------------------------------------------------------------------- rows


def event_entries(
    key: str,
    ids: Sequence[Any],
    product_ids: Sequence[Any],
    event_types: Sequence[Any],
    event_times: Sequence[Any],
) -> list[Entry | None]:
    """One `events` entry per row (None where the id or product is NULL: not sent).
    Times: epoch seconds, a datetime (naive means UTC) or a string the server parses."""
    if key not in EVENT_KEYS:
        raise BadRequest(f"events are keyed by {' or '.join(EVENT_KEYS)}, not {key!r}")
    out: list[Entry | None] = []
    for who, product, kind, when in zip(ids, product_ids, event_types, event_times, strict=True):
        if who is None or product is None:
            out.append(None)
            continue
        entry: Entry = {key: who, "product_id": product}
        if kind is not None:
            entry["event_type"] = kind
        if when is not None:
            entry["event_time"] = _time(when)
        out.append(entry)
    return out


def _time(value: Any) -> int | float | str:
    if isinstance(value, datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(stamp.timestamp())
    if isinstance(value, int | float | str):
        return value
    return str(value)


def epoch_seconds(array: pa.Array) -> list[int | None]:
    """An Arrow timestamp column (naive = UTC) as epoch seconds; other columns as they are."""
    if pa.types.is_timestamp(array.type):
        seconds = pc.cast(array, pa.timestamp("s", array.type.tz), safe=False)
        return pc.cast(seconds, pa.int64()).to_pylist()
    return array.to_pylist()


# ---------------------------------------------------------------------------- sending


@dataclass
class Verdicts:
    """What happened to each entry sent: 1 taken, 0 rejected; the reasons of the rejected."""

    taken: list[int]
    reasons: list[str] = field(default_factory=list)


def send_events(pool: EndpointPool, entries: Sequence[Entry]) -> Verdicts:
    """POST `entries` as one `{"events": [...]}`; on a partial 400 split and resend (see the
    module docstring). Raises EndpointError when the endpoint gives no usable answer."""
    verdicts = Verdicts([0] * len(entries))
    pending = [(0, len(entries))]
    while pending:
        lo, hi = pending.pop()
        status, body = pool.post_json({"events": list(entries[lo:hi])})
        if status == 200:
            _check_taken(pool, body, hi - lo)
            verdicts.taken[lo:hi] = [1] * (hi - lo)
            continue
        reason = body[:300].decode("utf-8", "replace").strip().replace("\n", " ")
        rejected = _REJECTED.search(reason) if status == 400 else None
        if rejected is None:
            raise EndpointError(f"endpoint {pool.name} answered HTTP {status}: {reason}")
        if hi - lo == 1 or int(rejected.group(1)) == hi - lo:
            verdicts.reasons.append(f"rows {lo + 1}-{hi}: {reason}" if hi - lo > 1 else reason)
            continue  # every entry of this slice is bad: they stay 0
        mid = (lo + hi) // 2
        pending += [(mid, hi), (lo, mid)]  # the first half goes first: row order is kept
    return verdicts


def _check_taken(pool: EndpointPool, body: bytes, sent: int) -> None:
    try:
        taken = json.loads(body)["taken"]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(
            f'endpoint {pool.name}: the reply to events is not {{"taken": n, ...}}: {body[:80]!r}'
        ) from None
    if taken != sent:
        raise EndpointError(f"endpoint {pool.name} took {taken} of {sent} events")


# ---------------------------------------------------------------------------- push


@dataclass
class PushStats:
    rows: int = 0  # rows read
    taken: int = 0
    rejected: int = 0
    skipped: int = 0  # NULL id or product: not sent
    requests: int = 0
    seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)  # the first few rejections

    def summary(self) -> str:
        rate = self.taken / self.seconds if self.seconds > 0 else 0.0
        line = (
            f"pushed {self.taken:,} events ({self.rows:,} rows read, {self.rejected:,} rejected,"
            f" {self.skipped:,} skipped for a NULL id) in {self.requests:,} requests,"
            f" {self.seconds:.1f} s: {rate:,.0f} events/s"
        )
        return line + (f"; first rejected: {self.reasons[0]}" if self.reasons else "")


@dataclass(frozen=True)
class EventColumns:
    """One batch of rows: the key (user_id or session_id) and the four columns."""

    key: str
    ids: list[Any]
    product_ids: list[Any]
    event_types: list[Any]
    event_times: list[Any]


def push_events(
    batches: Iterable[EventColumns], pool: EndpointPool, *, progress: bool = True
) -> PushStats:
    """Send every batch (see the module docstring). On a failed request raises RecsqlError
    saying how many events were taken before it stopped."""
    from model.progress import progress_bar

    stats, start = PushStats(), time.perf_counter()
    before = pool.requests
    with progress_bar(unit=" events", desc="push", disable=not progress) as bar:
        try:
            for columns in batches:
                entries = event_entries(
                    columns.key,
                    columns.ids,
                    columns.product_ids,
                    columns.event_types,
                    columns.event_times,
                )
                sent = [e for e in entries if e is not None]
                stats.rows += len(entries)
                stats.skipped += len(entries) - len(sent)
                if sent:
                    verdicts = send_events(pool, sent)
                    taken = sum(verdicts.taken)
                    stats.taken += taken
                    stats.rejected += len(sent) - taken
                    stats.reasons += verdicts.reasons[: 3 - len(stats.reasons)]
                bar.update(len(entries))
        except EndpointError as exc:
            stats.seconds = time.perf_counter() - start
            raise RecsqlError(
                f"stopped after {stats.taken:,} events taken ({stats.rejected:,} rejected, "
                f"{stats.rows:,} rows read): {exc}"
            ) from exc
        finally:
            stats.requests = pool.requests - before
    stats.seconds = time.perf_counter() - start
    log.info("%s", stats.summary())
    return stats


def _key(names: Sequence[str]) -> str:
    keys = [k for k in EVENT_KEYS if k in names]
    missing = [c for c in ("product_id",) if c not in names]
    if len(keys) != 1 or missing:
        raise BadRequest(
            f"the rows need a user_id or a session_id column (exactly one) and product_id;"
            f" optional: event_type, event_time (got {', '.join(names) or 'no columns'})"
        )
    return keys[0]


def arrow_batches(batches: Iterable[pa.RecordBatch]) -> Iterator[EventColumns]:
    """Arrow record batches with named columns -> EventColumns (timestamps -> epoch)."""
    key: str | None = None
    for batch in batches:
        if key is None:
            key = _key(batch.schema.names)
        if not batch.num_rows:
            continue
        columns = dict(zip(batch.schema.names, batch.columns, strict=True))
        empty = [None] * batch.num_rows

        def column(name: str, columns: dict = columns, empty: list = empty) -> list:
            return epoch_seconds(columns[name]) if name in columns else empty

        yield EventColumns(
            key, column(key), column("product_id"), column("event_type"), column("event_time")
        )


def duckdb_batches(con: Any, query: str, batch: int) -> Iterator[EventColumns]:
    """The rows of a DuckDB query, `batch` at a time."""
    import duckdb

    try:
        reader = con.sql(query).to_arrow_reader(batch)
        yield from arrow_batches(reader)
    except (duckdb.Error, pa.ArrowException) as exc:
        raise BadRequest(f"query failed: {first_line(exc)}") from exc


def file_batches(paths: Sequence[Path], batch: int) -> Iterator[EventColumns]:
    """REES46 event files (.csv, .csv.gz; header checked as `recsql load` checks it) in the
    order given, read by DuckDB; event_time goes as written ("2019-10-01 00:00:00 UTC"):
    the server parses it."""
    import duckdb

    from db.load import check_event_files

    con = duckdb.connect()
    query = (
        "SELECT user_id, product_id, event_type, event_time FROM read_csv($path,"
        " header = true, auto_detect = false, quote = '\"', escape = '\"',"
        " columns = $columns, null_padding = true)"
    )
    try:
        for path in check_event_files(paths):
            try:
                relation = con.sql(query, params={"path": str(path), "columns": FILE_COLUMNS})
                yield from arrow_batches(relation.to_arrow_reader(batch))
            except duckdb.Error as exc:
                raise BadRequest(f"{path}: {first_line(exc)}") from exc
    finally:
        con.close()


def mysql_batches(url: str, query: str, batch: int) -> Iterator[EventColumns]:
    """The rows of a MySQL/MariaDB query, streamed (server-side cursor)."""
    import pymysql
    import pymysql.cursors

    from db.load import mysql_connect

    conn = mysql_connect(url, cursorclass=pymysql.cursors.SSCursor)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(query)
            except pymysql.MySQLError as exc:
                raise BadRequest(f"query failed: {exc}") from exc
            names = [d[0] for d in cur.description or []]
            key = _key(names)
            while rows := cur.fetchmany(batch):
                columns = dict(zip(names, zip(*rows, strict=True), strict=True))
                empty = [None] * len(rows)
                yield EventColumns(
                    key,
                    list(columns[key]),
                    list(columns["product_id"]),
                    list(columns.get("event_type", empty)),
                    list(columns.get("event_time", empty)),
                )
    finally:
        conn.close()
