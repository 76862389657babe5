"""REES46 event files -> indexed train/test arrays (the seed's preparation, at full scale).

Semantics (the seed's, kept exactly, except its last-event bug):

- Weight per event: purchase 4, cart 3, remove_from_cart 2, anything else 1.
- Rows with an empty user_id or product_id (or event_time) are counted and skipped first.
- One pass of the >= `min_events` filter: count events per user and per product on the full
  data, keep the rows whose user AND product both reach the threshold (no fixed point).
- Index: row 0 is the user (product) with the most events in the kept data; descending count,
  ties broken by ascending id (the seed used pandas value_counts, whose tie order is arbitrary).
- Test set: each user's last kept event by event_time, ties broken by file order (files in the
  order given, folders expanded sorted by name, then line order). The seed's merges reordered
  rows, so its "last" event was truly the last for only 7% of users; here it is the real one.
- Training set: every other kept row (duplicates kept, one sample per row), in file and line
  order, with its event_time (the trainer orders each user's events by it). Earlier events of
  a user's test product stay: a repeat is what a history model learns from. The seed dropped
  them; `without_test_pairs()` gives its training set, and the mse/bpr objectives train on it.

DuckDB does the work in bounded memory (memory_limit, spilling to temp_directory). Each file
is appended to one table in order: DuckDB preserves insertion order for a single-table
INSERT ... SELECT, so `rowid` is the global file/line order that breaks event_time ties.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import json
import logging
import re
import resource
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np

from model.errors import DataError, first_line
from model.format import write_index
from model.progress import progress_bar

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("event_time", "event_type", "product_id", "user_id")
EVENT_WEIGHTS = {"purchase": 4, "cart": 3, "remove_from_cart": 2}  # anything else: 1
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"
PREPARED_MARKER = "prepared.json"
PREPARED_VERSION = 2  # 2: event times, and the test product's earlier events kept
_ARRAYS = {
    "train_users": np.int32,
    "train_items": np.int32,
    "train_labels": np.float32,
    "test_users": np.int32,
    "test_items": np.int32,
    "test_labels": np.float32,
    "train_times": np.int64,
    "test_times": np.int64,
    "user_ids": np.int64,
    "product_ids": np.int64,
}
_DEFAULT_MEMORY_LIMIT = "4GB"


@dataclass
class PreparedEvents:
    train_users: np.ndarray  # int32 row numbers into user_ids
    train_items: np.ndarray  # int32 row numbers into product_ids
    train_labels: np.ndarray  # float32 event weights, one sample per kept event row
    test_users: np.ndarray  # int32, one per user (their last event)
    test_items: np.ndarray  # int32
    test_labels: np.ndarray  # float32
    user_ids: np.ndarray  # int64 external user_id of each row
    product_ids: np.ndarray  # int64 external product_id of each row
    stats: dict = field(default_factory=dict)
    # int64 epoch seconds of each event; None: unknown, read as one second apart in row order
    train_times: np.ndarray | None = None
    test_times: np.ndarray | None = None

    def times(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, test) event times; without known times, the row order one second apart
        (every test event after every training event)."""
        if self.train_times is not None and self.test_times is not None:
            return self.train_times, self.test_times
        n = len(self.train_users)
        return np.arange(n, dtype=np.int64), np.arange(n, n + len(self.test_users), dtype=np.int64)

    def without_test_pairs(self) -> PreparedEvents:
        """The seed's training set: no training row of a user's test product."""
        test_item = np.full(len(self.user_ids), -1, np.int64)
        test_item[self.test_users] = self.test_items
        keep = self.train_items != test_item[self.train_users]
        train_times = None if self.train_times is None else self.train_times[keep]
        return dataclasses.replace(
            self,
            train_users=self.train_users[keep],
            train_items=self.train_items[keep],
            train_labels=self.train_labels[keep],
            train_times=train_times,
        )

    def save(self, out_dir: Path) -> None:
        """`<name>.npy` per array, the two id indexes as CSV, and prepared.json (stats)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        train_times, test_times = self.times()
        arrays = {**self.__dict__, "train_times": train_times, "test_times": test_times}
        for name in _ARRAYS:
            np.save(out_dir / f"{name}.npy", arrays[name], allow_pickle=False)
        write_index(out_dir / "user_index.csv", "user_id", "user", self.user_ids)
        write_index(out_dir / "product_index.csv", "product_id", "item", self.product_ids)
        marker = {
            "format": "recsql-prepared",
            "format_version": PREPARED_VERSION,
            "stats": self.stats,
        }
        (out_dir / PREPARED_MARKER).write_text(json.dumps(marker, indent=2))

    @classmethod
    def load(cls, out_dir: Path) -> PreparedEvents:
        out_dir = Path(out_dir)
        if not is_prepared_dir(out_dir):
            raise DataError(f"{out_dir}: not a prepared folder (no valid {PREPARED_MARKER})")
        marker = json.loads((out_dir / PREPARED_MARKER).read_text())
        if marker.get("format_version") != PREPARED_VERSION:
            raise DataError(
                f"{out_dir}: prepared by an older recsql (format_version"
                f" {marker.get('format_version')}, no event times); run `recsql prepare` again"
            )
        stats = marker.get("stats", {})
        arrays = {}
        for name, dtype in _ARRAYS.items():
            path = out_dir / f"{name}.npy"
            try:
                arrays[name] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read the prepared array ({exc})") from exc
            if arrays[name].dtype != dtype or arrays[name].ndim != 1:
                raise DataError(f"{path}: expected a 1-d {np.dtype(dtype)} array")
        prepared = cls(**arrays, stats=stats)
        prepared._check()
        return prepared

    @classmethod
    def from_events(
        cls,
        user_ids: np.ndarray,
        product_ids: np.ndarray,
        weights: np.ndarray,
        repeats: bool = True,
        times: np.ndarray | None = None,
    ) -> PreparedEvents:
        """Index events given oldest first: each user's last event is the test row (users
        with one event have none) and every other event is a training row, in order.
        `times` (epoch seconds) default to the row order, one second apart.

        The same index order as `prepare_events` (most events first, ties by id), and no
        event filtered. `repeats=False` drops a user's earlier events of their test product
        from training, as `prepare_events` does, so that a test item is new to its user.
        """
        user_ids, product_ids = np.asarray(user_ids, np.int64), np.asarray(product_ids, np.int64)
        weights = np.asarray(weights, np.float32)
        times = np.arange(len(user_ids)) if times is None else np.asarray(times, np.int64)
        if not len(user_ids) == len(product_ids) == len(weights) == len(times):
            raise DataError("user_ids, product_ids, weights and times differ in length")
        uid, u = _ranked_index(user_ids)
        pid, i = _ranked_index(product_ids)
        users, first_from_end = np.unique(u[::-1], return_index=True)
        last = len(u) - 1 - first_from_end  # each user's latest event, users in row order
        last = last[np.bincount(u, minlength=len(uid))[users] >= 2]
        train = np.ones(len(u), bool)
        train[last] = False
        if not repeats:
            test_item = np.full(len(uid), -1, np.int64)
            test_item[u[last]] = i[last]
            train &= i != test_item[u]
        return cls(
            train_users=u[train].astype(np.int32),
            train_items=i[train].astype(np.int32),
            train_labels=weights[train],
            test_users=u[last].astype(np.int32),
            test_items=i[last].astype(np.int32),
            test_labels=weights[last],
            user_ids=uid,
            product_ids=pid,
            train_times=times[train],
            test_times=times[last],
        )

    def _check(self) -> None:
        n_train, n_test = len(self.train_users), len(self.test_users)
        if len(self.train_items) != n_train or len(self.train_labels) != n_train:
            raise DataError("prepared data: train arrays differ in length")
        if len(self.test_items) != n_test or len(self.test_labels) != n_test:
            raise DataError("prepared data: test arrays differ in length")
        train_times, test_times = self.times()
        if len(train_times) != n_train or len(test_times) != n_test:
            raise DataError("prepared data: event times differ in length from the events")
        for rows, ids, what in (
            (self.train_users, self.user_ids, "train_users"),
            (self.test_users, self.user_ids, "test_users"),
            (self.train_items, self.product_ids, "train_items"),
            (self.test_items, self.product_ids, "test_items"),
        ):
            if len(rows) and (rows.min() < 0 or rows.max() >= len(ids)):
                raise DataError(f"prepared data: {what} points outside the {len(ids)}-row index")


def _ranked_index(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids by row: most events first, ties by ascending id; each event's row)."""
    unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = np.lexsort((unique, -counts))
    row_of = np.empty(len(unique), np.int64)
    row_of[order] = np.arange(len(unique))
    return unique[order], row_of[inverse]


def is_prepared_dir(path: Path) -> bool:
    marker = Path(path) / PREPARED_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == "recsql-prepared"
    except (OSError, ValueError):
        return False


def expand_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files in the order given; a folder becomes its .csv/.csv.gz files sorted by name."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                (c for c in path.iterdir() if c.is_file() and _is_event_file(c)),
                key=lambda c: c.name,
            )
            if not found:
                raise DataError(f"{path}: folder holds no .csv or .csv.gz files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError("no event files given")
    return files


def _is_event_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".csv") or name.endswith(".csv.gz")


def read_header(path: Path) -> list[str]:
    """The header's column names; DataError naming the file when it cannot be used."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:  # BOM-tolerant
            line = f.readline()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from exc
    names = [n.strip().strip('"') for n in line.rstrip("\r\n").split(",")]
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{path}: line 1: missing column(s) {', '.join(missing)}; the header must name "
            f"{', '.join(REQUIRED_COLUMNS)} (REES46 layout)"
        )
    if len(set(names)) != len(names):
        raise DataError(f"{path}: line 1: duplicate column names in the header")
    return names


def prepare_events(
    paths: Sequence[Path],
    min_events: int = 5,
    progress: bool = True,
    memory_limit: str | None = None,
    threads: int | None = None,
    temp_dir: Path | None = None,
) -> PreparedEvents:
    """Read event files and build the indexed train/test arrays (see the module docstring)."""
    started = time.perf_counter()
    files = expand_inputs(paths)
    headers = [read_header(f) for f in files]
    with tempfile.TemporaryDirectory(prefix="recsql-prepare-", dir=temp_dir) as spill:
        con = _connect(Path(spill), memory_limit, threads)
        try:
            with _step("read"):
                _load_files(con, files, headers, progress)
            with (
                _step("filter, index, split"),
                progress_bar(
                    total=_BUILD_STEPS, desc="index", unit="step", disable=not progress
                ) as bar,
            ):
                stats = _build_tables(con, min_events, bar)
            with _step("fetch"):
                prepared = _fetch(con, stats)
        finally:
            con.close()
    stats.update(
        files=[str(f) for f in files],
        min_events=min_events,
        memory_limit=memory_limit or _DEFAULT_MEMORY_LIMIT,
        threads=threads,
        seconds=round(time.perf_counter() - started, 3),
    )
    prepared.stats = stats
    log.info("prepared %s", {k: v for k, v in stats.items() if k != "files"})
    return prepared


def load_events(inputs: list[Path], min_events: int = 5, progress: bool = True) -> PreparedEvents:
    """A prepared folder as is, or event files/folders prepared now."""
    if not inputs:
        raise DataError("no inputs: give event .csv/.csv.gz files, folders or a prepared folder")
    if len(inputs) == 1 and is_prepared_dir(inputs[0]):
        return PreparedEvents.load(inputs[0])
    return prepare_events(inputs, min_events=min_events, progress=progress)


@contextmanager
def _step(name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.debug(
        "prepare %s: %.1f s, peak RSS so far %.0f MB", name, time.perf_counter() - started, peak_mb
    )


def _connect(
    spill: Path, memory_limit: str | None, threads: int | None
) -> duckdb.DuckDBPyConnection:
    config = {
        "memory_limit": memory_limit or _DEFAULT_MEMORY_LIMIT,
        "temp_directory": str(spill),
        # rowid must follow file and line order: never let DuckDB reorder inserts.
        "preserve_insertion_order": True,
    }
    if threads:
        config["threads"] = int(threads)
    try:
        # A database file, not :memory:, so the events table is stored compressed and DuckDB
        # can drop its pages from memory without writing them out again.
        return duckdb.connect(str(spill / "prepare.duckdb"), config=config)
    except duckdb.Error as exc:
        raise DataError(f"cannot start DuckDB with {config} ({first_line(exc)})") from exc


def _load_files(
    con: duckdb.DuckDBPyConnection, files: list[Path], headers: list[list[str]], progress: bool
) -> None:
    con.execute("CREATE TABLE ev (t TIMESTAMP, w UTINYINT, u BIGINT, p BIGINT)")
    weight = " ".join(f"WHEN '{k}' THEN {v}" for k, v in EVENT_WEIGHTS.items())
    # Only the four columns are projected: DuckDB skips converting the others.
    insert = f"""INSERT INTO ev
        SELECT event_time, CASE event_type {weight} ELSE 1 END, user_id, product_id
        FROM read_csv($path, header = true, auto_detect = false, delim = ',', quote = '"',
                      columns = $columns, timestampformat = '{TIME_FORMAT}')"""
    sizes = [f.stat().st_size for f in files]
    if progress:  # DuckDB tracks query progress only with its (silenced) progress bar on
        con.execute("SET enable_progress_bar = true; SET enable_progress_bar_print = false")
    with progress_bar(
        total=sum(sizes), unit="B", unit_scale=True, desc="read", disable=not progress
    ) as bar:
        for path, header, size, done in zip(
            files, headers, sizes, itertools.accumulate([0, *sizes]), strict=False
        ):
            columns = {n: "VARCHAR" for n in header}
            columns.update(event_time="TIMESTAMP", product_id="BIGINT", user_id="BIGINT")
            try:
                with _poll_progress(con, bar, done, size):
                    con.execute(insert, {"path": str(path), "columns": columns})
            except duckdb.Error as exc:
                raise DataError(_csv_error(path, exc)) from exc
            bar.n = done + size
            bar.refresh()


@contextmanager
def _poll_progress(
    con: duckdb.DuckDBPyConnection, bar: tqdm, done: int, size: int
) -> Iterator[None]:
    """Move `bar` through one file while DuckDB reads it (a single file may be 14 GB)."""
    if bar.disable:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            percent = con.query_progress()
            if percent >= 0:
                bar.n = done + int(size * min(percent, 100.0) / 100.0)
                bar.refresh()

    thread = threading.Thread(target=poll, name="prepare-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


_LINE = re.compile(r"CSV Error on Line: (\d+)")
_CONVERT = re.compile(r'converting column "([^"]+)"\. Could not convert string "(.*?)" to')
_WIDTH = re.compile(r"Expected Number of Columns: (\d+) Found: (\d+)")
_EXPECTED = {
    "event_time": f"a time like 2019-10-01 00:00:00 UTC ({TIME_FORMAT})",
    "product_id": "an integer id",
    "user_id": "an integer id",
}


def _csv_error(path: Path, exc: duckdb.Error) -> str:
    """DuckDB's long CSV error as one line: file, line, column and what was expected."""
    text = str(exc)
    line = _LINE.search(text)
    where = f"{path}: line {line.group(1)}" if line else f"{path}"
    if m := _CONVERT.search(text):
        column, value = m.groups()
        return f'{where}, column {column}: "{value}" is not {_EXPECTED.get(column, column)}'
    if m := _WIDTH.search(text):
        return f"{where}: expected {m.group(1)} fields as in the header, found {m.group(2)}"
    return f"{where}: cannot read the events ({first_line(exc)})"


def _sql(
    con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None, bar: tqdm | None = None
) -> duckdb.DuckDBPyConnection:
    started = time.perf_counter()
    result = con.execute(sql, params)
    log.debug("%.2f s: %s", time.perf_counter() - started, " ".join(sql.split())[:70])
    if bar is not None:
        bar.update(1)
    return result


_BUILD_STEPS = 8  # _sql calls in _build_tables


def _build_tables(con: duckdb.DuckDBPyConnection, min_events: int, bar: tqdm) -> dict:
    """Counts, the one-pass filter, both indexes, each user's last event and the train rows."""
    read, empty_id, empty_time = _sql(
        con,
        """SELECT count(*), count(*) FILTER (u IS NULL OR p IS NULL),
                  count(*) FILTER (u IS NOT NULL AND p IS NOT NULL AND t IS NULL) FROM ev""",
        bar=bar,
    ).fetchone()
    valid = "u IS NOT NULL AND p IS NOT NULL AND t IS NOT NULL"
    for key, table in (("u", "ku"), ("p", "kp")):
        _sql(
            con,
            f"""CREATE TABLE {table} AS
                SELECT {key} FROM ev WHERE {valid} GROUP BY {key} HAVING count(*) >= $n""",
            {"n": int(min_events)},
            bar=bar,
        )
    kept = f"FROM ev WHERE {valid} AND u IN (SELECT u FROM ku) AND p IN (SELECT p FROM kp)"
    # The last event has the greatest (event_time, rowid), rowid being file then line order;
    # packed into one HUGEINT key because arg_max on a struct key is several times slower.
    last = "epoch_us(t)::HUGEINT * 18446744073709551616 + rowid"
    _sql(
        con,
        f"""CREATE TABLE uc AS
            SELECT u, count(*) AS n, arg_max(p, {last}) AS last_p, arg_max(w, {last}) AS last_w,
                   arg_max(rowid, {last}) AS last_r, epoch_us(max(t)) // 1000000 AS last_s
            {kept} GROUP BY u""",
        bar=bar,
    )
    _sql(con, f"CREATE TABLE pc AS SELECT p, count(*) AS n {kept} GROUP BY p", bar=bar)
    (kept_rows,) = _sql(con, "SELECT coalesce(sum(n), 0) FROM uc", bar=bar).fetchone()
    if not kept_rows:
        raise DataError(
            f"no events left: no row has both a user and a product with >= {min_events} events "
            f"({read} rows read, {empty_id} with an empty id)"
        )
    _sql(
        con,
        """CREATE TABLE users AS SELECT u, last_p, last_w, last_r, last_s,
                  (row_number() OVER (ORDER BY n DESC, u ASC) - 1)::INTEGER AS ui FROM uc;
           CREATE TABLE products AS SELECT p,
                  (row_number() OVER (ORDER BY n DESC, p ASC) - 1)::INTEGER AS pi FROM pc;
           DROP TABLE uc; DROP TABLE pc; DROP TABLE ku; DROP TABLE kp;""",
        bar=bar,
    )
    # Joining both indexes keeps exactly the kept rows (every kept user has a last event).
    _sql(
        con,
        """CREATE TABLE train AS
           SELECT users.ui, products.pi, ev.w, epoch_us(ev.t) // 1000000 AS s
           FROM ev JOIN users ON ev.u = users.u JOIN products ON ev.p = products.p
           WHERE ev.rowid <> users.last_r AND ev.t IS NOT NULL
           ORDER BY ev.rowid;
           DROP TABLE ev;""",
        bar=bar,
    )
    return {
        "events_read": int(read),
        "rows_skipped_empty_id": int(empty_id),
        "rows_skipped_empty_time": int(empty_time),
        "rows_kept": int(kept_rows),
    }


def _fetch(con: duckdb.DuckDBPyConnection, stats: dict) -> PreparedEvents:
    """Arrays out of DuckDB one column at a time, so only one copy is in flight."""

    def column(sql: str, dtype: type) -> np.ndarray:
        result = con.execute(sql).fetchnumpy()
        return np.ascontiguousarray(next(iter(result.values())), dtype=dtype)

    users = con.execute("SELECT u, ui FROM users ORDER BY ui").fetchnumpy()
    user_ids = np.asarray(users["u"], dtype=np.int64)
    product_ids = column("SELECT p FROM products ORDER BY pi", np.int64)
    test = con.execute(
        """SELECT users.ui, products.pi, users.last_w::FLOAT AS w, users.last_s AS s
           FROM users JOIN products ON users.last_p = products.p ORDER BY users.ui"""
    ).fetchnumpy()
    prepared = PreparedEvents(
        train_users=column("SELECT ui FROM train", np.int32),
        train_items=column("SELECT pi FROM train", np.int32),
        train_labels=column("SELECT w::FLOAT FROM train", np.float32),
        test_users=np.asarray(test["ui"], dtype=np.int32),
        test_items=np.asarray(test["pi"], dtype=np.int32),
        test_labels=np.asarray(test["w"], dtype=np.float32),
        user_ids=user_ids,
        product_ids=product_ids,
        train_times=column("SELECT s FROM train", np.int64),
        test_times=np.asarray(test["s"], dtype=np.int64),
    )
    stats.update(
        users=len(user_ids),
        products=len(product_ids),
        train_rows=len(prepared.train_users),
        test_rows=len(prepared.test_users),
    )
    return prepared


def run_prepare_command(args: argparse.Namespace) -> int:
    prepared = prepare_events(
        args.inputs,
        min_events=getattr(args, "min_events", 5),
        progress=not getattr(args, "no_progress", False),
        memory_limit=getattr(args, "memory_limit", None),
        threads=getattr(args, "threads", None),
        temp_dir=getattr(args, "temp_dir", None),
    )
    prepared.save(args.out)
    s = prepared.stats
    print(
        f"read {s['events_read']:,} events from {len(s['files'])} file(s) in {s['seconds']:.1f} s; "
        f"skipped {s['rows_skipped_empty_id']:,} rows with an empty id"
        + (
            f" and {s['rows_skipped_empty_time']:,} with an empty event_time"
            if s["rows_skipped_empty_time"]
            else ""
        )
        + f"; kept {s['rows_kept']:,} rows of users and products with >= {s['min_events']} events"
    )
    print(
        f"{s['users']:,} users, {s['products']:,} products; train {s['train_rows']:,} rows, "
        f"test {s['test_rows']:,} rows (one per user); wrote {args.out}"
    )
    return 0
