"""`recsql score`: stream pairs from a query, score them over HTTP in large batches,
write a scores table. The path for millions of rows. On MySQL/MariaDB with an
in-server model, `score_mysql_in_server` does it in one INSERT ... SELECT.

Rows stream from the engine (DuckDB: Arrow batches; MySQL: a server-side
cursor), a few batches are in flight at once on a small thread pool, and the
results are written in query order to `<table>__new`, which replaces `<table>`
only when every batch has been scored: a failed run leaves the old table as it
was. The table holds the function's arguments and `score` (NULL for rows the
endpoint could not score or with a NULL argument).
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
from tqdm import tqdm

from db.duckdb_udf import ON_ERROR, duckdb_type, make_udf
from db.functions import WILL_PURCHASE, SqlFunction
from db.http import Endpoints
from db.load import mysql_connect
from model.errors import BadRequest, first_line

log = logging.getLogger(__name__)

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,55}$")
_ARROW_ARG = {"BIGINT": pa.int64(), "INTEGER": pa.int32(), "VARCHAR": pa.string()}


@dataclass
class ScoreStats:
    table: str
    rows: int
    nulls: int
    requests: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"scored {self.rows:,} rows into {self.table} in {self.seconds:.1f} s "
            f"({self.rows_per_s:,.0f} rows/s, {self.requests:,} requests, {self.nulls:,} NULL)"
        )


@dataclass(frozen=True)
class ScoreOptions:
    function: SqlFunction = WILL_PURCHASE
    table: str = "scores"
    batch: int = 10_000
    workers: int = 4
    on_error: str = "error"
    progress: bool = True

    def __post_init__(self) -> None:
        if not _TABLE.match(self.table):
            raise BadRequest(f"bad table name {self.table!r}: letters, digits and _ only")
        if self.function.returns_text:
            raise BadRequest(f"{self.function.name} returns text; recsql score writes numbers")
        if not 1 <= self.batch <= 1_000_000:
            raise BadRequest("--batch must be 1..1,000,000 rows")
        if not 1 <= self.workers <= 64:
            raise BadRequest("--workers must be 1..64")
        if self.on_error not in ON_ERROR:
            raise BadRequest(f"--on-error must be one of {', '.join(ON_ERROR)}")


def _arg_types(fn: SqlFunction) -> list[pa.DataType]:
    return [_ARROW_ARG.get(duckdb_type(a.sql_type), pa.float64()) for a in fn.args]


# ------------------------------------------------------------------------- driver


def _score_stream(
    batches: Iterator[list[pa.Array]],
    write: Any,
    endpoints: Endpoints,
    opts: ScoreOptions,
) -> tuple[int, int, int]:
    """Score batches with up to `workers` requests in flight; write results in order."""
    fn = opts.function
    pool = endpoints.pool(fn.endpoint, fn.target_model, fn.custom_attributes)
    first_request = pool.requests
    score = make_udf(fn, pool, opts.on_error, max_rows=opts.batch)
    names = [a.name for a in fn.args] + ["score"]
    rows = nulls = 0
    pending: deque[tuple[list[pa.Array], Future[pa.Array]]] = deque()
    bar = tqdm(unit=" rows", unit_scale=True, disable=not opts.progress, file=sys.stderr)

    def drain_one() -> None:
        nonlocal rows, nulls
        columns, future = pending.popleft()
        scores = future.result()
        write(pa.table(columns + [scores], names=names))
        rows += len(scores)
        nulls += scores.null_count
        bar.update(len(scores))

    with bar, ThreadPoolExecutor(opts.workers, thread_name_prefix="recsql-score") as executor:
        try:
            for columns in batches:
                pending.append((columns, executor.submit(score, *columns)))
                if len(pending) >= 2 * opts.workers:
                    drain_one()
            while pending:
                drain_one()
        finally:
            for _, future in pending:
                future.cancel()
    return rows, nulls, pool.requests - first_request


def _columns(fn: SqlFunction, batch: pa.RecordBatch) -> list[pa.Array]:
    if batch.num_columns != len(fn.args):
        raise BadRequest(
            f"the query returns {batch.num_columns} columns; {fn.name} takes {len(fn.args)} "
            f"({', '.join(a.name for a in fn.args)})"
        )
    return [col.cast(t) for col, t in zip(batch.columns, _arg_types(fn), strict=True)]


# ------------------------------------------------------------------------- DuckDB


def score_duckdb(
    con: duckdb.DuckDBPyConnection, query: str, endpoints: Endpoints, opts: ScoreOptions
) -> ScoreStats:
    """Score `query`'s rows (one column per function argument) into DuckDB table opts.table."""
    start = time.perf_counter()
    fn, new = opts.function, f"{opts.table}__new"
    reader_con, writer = con.cursor(), con.cursor()
    cols = ", ".join(f'"{a.name}" {duckdb_type(a.sql_type)}' for a in fn.args)
    writer.execute(f'CREATE OR REPLACE TABLE "{new}" ({cols}, score {duckdb_type(fn.returns)})')

    def write(table: pa.Table) -> None:
        writer.register("_recsql_batch", table)
        writer.execute(f'INSERT INTO "{new}" SELECT * FROM _recsql_batch')
        writer.unregister("_recsql_batch")

    try:
        try:
            reader = reader_con.sql(query).to_arrow_reader(opts.batch)
        except duckdb.Error as exc:
            raise BadRequest(f"query failed: {first_line(exc)}") from exc
        batches = _duckdb_batches(reader, fn)
        rows, nulls, requests = _score_stream(batches, write, endpoints, opts)
    except BaseException:
        writer.execute(f'DROP TABLE IF EXISTS "{new}"')
        raise
    finally:
        reader_con.close()
    writer.execute("BEGIN TRANSACTION")  # readers see the old table or the new one
    writer.execute(f'DROP TABLE IF EXISTS "{opts.table}"')
    writer.execute(f'ALTER TABLE "{new}" RENAME TO "{opts.table}"')
    writer.execute("COMMIT")
    writer.close()
    stats = ScoreStats(opts.table, rows, nulls, requests, time.perf_counter() - start)
    log.info("%s", stats.summary())
    return stats


def _duckdb_batches(reader: Any, fn: SqlFunction) -> Iterator[list[pa.Array]]:
    try:
        for batch in reader:
            if batch.num_rows:
                yield _columns(fn, batch)
    except (duckdb.Error, pa.ArrowException) as exc:  # errors can surface mid-stream
        raise BadRequest(f"query failed: {first_line(exc)}") from exc


# -------------------------------------------------------------------------- MySQL

_MYSQL_TYPE = {"FLOAT": "FLOAT", "DOUBLE": "DOUBLE", "BIGINT": "BIGINT", "INTEGER": "INT"}


def score_mysql(url: str, query: str, endpoints: Endpoints, opts: ScoreOptions) -> ScoreStats:
    """Score `query`'s rows on the MySQL database at `url` into table opts.table."""
    import pymysql
    import pymysql.cursors

    start = time.perf_counter()
    fn, table = opts.function, opts.table
    with tempfile.TemporaryDirectory(prefix="recsql-score-") as tmp:
        out_path = Path(tmp) / "scores.csv"
        reader_conn = mysql_connect(url, cursorclass=pymysql.cursors.SSCursor)
        try:
            with open(out_path, "wb") as out:
                options = pa_csv.WriteOptions(include_header=False, quoting_style="needed")

                def write(batch: pa.Table) -> None:
                    pa_csv.write_csv(batch, out, options)

                with reader_conn.cursor() as cur:
                    try:
                        cur.execute(query)
                    except pymysql.MySQLError as exc:
                        raise BadRequest(f"query failed: {exc}") from exc
                    batches = _mysql_batches(cur, fn, opts.batch)
                    rows, nulls, requests = _score_stream(batches, write, endpoints, opts)
        finally:
            reader_conn.close()
        _mysql_replace(url, fn, table, out_path)
    stats = ScoreStats(table, rows, nulls, requests, time.perf_counter() - start)
    log.info("%s", stats.summary())
    return stats


def score_mysql_in_server(url: str, query: str, opts: ScoreOptions) -> ScoreStats:
    """Score `query`'s rows inside the MySQL/MariaDB server, where the function's
    endpoint is an in-server model (`recsql sql install --in-server`): one
    INSERT ... SELECT, so no row leaves the server. on_error "null" calls the
    loadable function directly (NULL for a row it cannot score); "error" goes
    through the `<name>_strict` wrapper, so a failure aborts the statement and the
    old table stays (slower: MariaDB runs a stored function's body per row)."""
    import pymysql

    from db.mysql_udf import STRICT_SUFFIX, allow_list_name, loadable_function

    start = time.perf_counter()
    fn, table = opts.function, opts.table
    new, old = f"{table}__new", f"{table}__old"
    ddl = ", ".join(f"`{a.name}` {a.sql_type.upper()} NULL" for a in fn.args)
    score_type = _MYSQL_TYPE.get(duckdb_type(fn.returns), "DOUBLE")
    conn = mysql_connect(url)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(f"SELECT * FROM ({query}) AS recsql_q LIMIT 0")
            except pymysql.MySQLError as exc:
                raise BadRequest(f"query failed: {exc}") from exc
            columns = [d[0] for d in cur.description]
            if len(columns) != len(fn.args):
                raise BadRequest(
                    f"the query returns {len(columns)} columns; {fn.name} takes {len(fn.args)}"
                )
            quoted = ", ".join("`" + c.replace("`", "``") + "`" for c in columns)
            if opts.on_error == "error":
                call = f"`{fn.name}{STRICT_SUFFIX}`({quoted})"
            else:
                call = f"{loadable_function(fn)}('{allow_list_name(fn)}', {quoted})"
            cur.execute(f"DROP TABLE IF EXISTS `{new}`, `{old}`")
            cur.execute(
                f"CREATE TABLE `{new}` ({ddl}, `score` {score_type} NULL) "
                "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            )
            try:
                rows = cur.execute(
                    f"INSERT INTO `{new}` SELECT {quoted}, {call} FROM ({query}) AS recsql_q"
                )
                cur.execute(f"SELECT COUNT(*) FROM `{new}` WHERE score IS NULL")
                (nulls,) = cur.fetchone()
                _swap_in(cur, table, [a.name for a in fn.args])
            except pymysql.MySQLError as exc:
                cur.execute(f"DROP TABLE IF EXISTS `{new}`")
                raise BadRequest(f"in-server scoring failed: {exc.args[-1]}") from exc
    finally:
        conn.close()
    stats = ScoreStats(table, rows, int(nulls), 0, time.perf_counter() - start)
    log.info("%s", stats.summary())
    return stats


def _swap_in(cur: Any, table: str, key: list[str]) -> None:
    """Index `table`__new on the key columns and put it in `table`'s place in one RENAME
    (readers see the old table or the new one, never a half-written one)."""
    new, old = f"{table}__new", f"{table}__old"
    names = ", ".join(f"`{c}`" for c in key)
    cur.execute(f"ALTER TABLE `{new}` ADD INDEX ix_{table}_key ({names})")
    cur.execute(
        "SELECT 1 FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_name = %s",
        (table,),
    )
    if cur.fetchall():
        cur.execute(f"RENAME TABLE `{table}` TO `{old}`, `{new}` TO `{table}`")
        cur.execute(f"DROP TABLE `{old}`")
    else:
        cur.execute(f"RENAME TABLE `{new}` TO `{table}`")


def _mysql_batches(cur: Any, fn: SqlFunction, size: int) -> Iterator[list[pa.Array]]:
    types = _arg_types(fn)
    while True:
        rows = cur.fetchmany(size)
        if not rows:
            return
        if len(rows[0]) != len(fn.args):
            raise BadRequest(
                f"the query returns {len(rows[0])} columns; {fn.name} takes {len(fn.args)}"
            )
        columns = zip(*rows, strict=True)
        yield [pa.array(col, type=t) for col, t in zip(columns, types, strict=True)]


def _mysql_replace(url: str, fn: SqlFunction, table: str, csv_path: Path) -> None:
    import pymysql

    new, old = f"{table}__new", f"{table}__old"
    columns = [a.name for a in fn.args]
    ddl = ", ".join(f"`{a.name}` {a.sql_type.upper()} NULL" for a in fn.args)
    score_type = _MYSQL_TYPE.get(duckdb_type(fn.returns), "DOUBLE")
    variables = ", ".join(f"@c{i}" for i in range(len(columns) + 1))
    # Empty CSV fields are NULLs (pyarrow writes NULL as an empty field).
    sets = ", ".join(f"`{c}` = NULLIF(@c{i}, '')" for i, c in enumerate(columns + ["score"]))
    conn = mysql_connect(url, local_infile=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS `{new}`, `{old}`")
            cur.execute(
                f"CREATE TABLE `{new}` ({ddl}, `score` {score_type} NULL) "
                "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            )
            try:
                cur.execute(
                    f"LOAD DATA LOCAL INFILE %s INTO TABLE `{new}` CHARACTER SET utf8mb4 "
                    "FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
                    f"LINES TERMINATED BY '\\n' ({variables}) SET {sets}",
                    (str(csv_path),),
                )
                _swap_in(cur, table, columns)
            except pymysql.MySQLError:
                cur.execute(f"DROP TABLE IF EXISTS `{new}`")
                raise
    finally:
        conn.close()
