"""What users did, from REES46 event files or a SQL table, into one DuckDB table.

`load_events` fills `ev(t TIMESTAMP, type VARCHAR, u BIGINT, p BIGINT, price DOUBLE)`
with the view, cart and purchase events in [since, until) (the recommendations' first
inference time to their last plus the window, all UTC) of the (user, product) pairs in
the caller's table `pairs(u, p)`: no other event can match a recommendation, and
keeping only these bounds the memory a month of REES46 events would take. Sources:

- event files/folders (`recsql synth` output, the REES46 monthly CSVs, .csv.gz too),
  read by DuckDB with the header check and folder expansion of training/events.py;
- a DuckDB database file and table (`recsql load --engine duckdb` writes `events`);
- a MySQL/MariaDB table (`recsql load --engine mysql`), through PyMySQL with the
  table name checked as an identifier and the time range passed as parameters.

`price` is optional: without it (or where it is empty) revenue is unknown, not zero.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from model.errors import DataError, first_line
from serve.events import redact
from training.events import REQUIRED_COLUMNS, TIME_FORMAT, expand_inputs, read_header

EVENT_TYPES = ("view", "cart", "purchase")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_CREATE = "CREATE OR REPLACE TABLE ev (t TIMESTAMP, type VARCHAR, u BIGINT, p BIGINT, price DOUBLE)"


def load_events(
    con: duckdb.DuckDBPyConnection,
    since_us: int,
    until_us: int,
    files: Sequence[Path] = (),
    db: Path | None = None,
    url: str | None = None,
    table: str = "events",
) -> bool:
    """Fill `ev` from exactly one source; whether any source had a price column."""
    if sum(bool(s) for s in (files, db, url)) != 1:
        raise DataError("give event files, or --events-db, or --events-url (exactly one)")
    con.execute(_CREATE)
    window = {"since": _timestamp(since_us), "until": _timestamp(until_us)}
    if files:
        return _from_files(con, list(files), window)
    if not _IDENT.match(table):
        raise DataError(f"--events-table {table!r} is not a table name (letters, digits, _)")
    if db:
        return _from_duckdb(con, Path(db), table, window)
    assert url is not None
    return _from_mysql(con, url, table, window)


def _timestamp(epoch_us: int) -> datetime:
    return datetime.fromtimestamp(epoch_us / 1e6, UTC).replace(tzinfo=None)


def _from_files(con: duckdb.DuckDBPyConnection, paths: list[Path], window: dict) -> bool:
    found_price = False
    for path in expand_inputs(paths):
        header = read_header(path)
        columns = {name: "VARCHAR" for name in header}
        columns.update(event_time="TIMESTAMP", product_id="BIGINT", user_id="BIGINT")
        price = "price" in header
        if price:
            columns["price"] = "DOUBLE"
        found_price |= price
        relation = f"""read_csv($path, header = true, auto_detect = false, delim = ',',
            quote = '"', columns = $columns, timestampformat = '{TIME_FORMAT}')"""
        try:
            _run_insert(con, relation, "TIMESTAMP", price, window, path=str(path), columns=columns)
        except duckdb.Error as exc:
            raise DataError(f"{path}: cannot read the events ({first_line(exc)[:300]})") from exc
    return found_price


def _run_insert(
    con: duckdb.DuckDBPyConnection,
    source: str,
    time_type: str,
    price: bool,
    window: dict,
    **params: Any,
) -> None:
    when = "event_time::TIMESTAMP"
    if time_type.upper().startswith(("VARCHAR", "TEXT", "CHAR")):
        when = (
            f"coalesce(try_strptime(event_time, '{TIME_FORMAT}'),"
            " try_cast(event_time AS TIMESTAMP))"
        )
    cost = "try_cast(price AS DOUBLE)" if price else "NULL::DOUBLE"
    con.execute(
        f"""INSERT INTO ev
            SELECT t, type, u, p, price FROM (
                SELECT {when} AS t, lower(trim(event_type::VARCHAR)) AS type,
                       user_id::BIGINT AS u, product_id::BIGINT AS p, {cost} AS price
                FROM {source}) AS s
            WHERE t >= $since AND t < $until AND type IN {EVENT_TYPES!r}
              AND EXISTS (SELECT 1 FROM pairs WHERE pairs.u = s.u AND pairs.p = s.p)""",
        {**window, **params},
    )


def _check_columns(columns: dict[str, str], where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)}; the table needs "
            f"{', '.join(REQUIRED_COLUMNS)} (price optional)"
        )


def _from_duckdb(con: duckdb.DuckDBPyConnection, path: Path, table: str, window: dict) -> bool:
    if not path.is_file():
        raise DataError(f"{path}: no such DuckDB database file")
    try:
        src = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        reason = first_line(exc)[:300]
        raise DataError(f"{path}: cannot open as a DuckDB database ({reason})") from exc
    try:
        rows = src.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?",
            [table],
        ).fetchall()
        if not rows:
            raise DataError(f"{path}: no table {table!r}")
        columns = {name.lower(): kind for name, kind in rows}
        _check_columns(columns, f"{path}: table {table}")
        wanted = [*REQUIRED_COLUMNS, *(["price"] if "price" in columns else [])]
        data = src.sql(f'SELECT {", ".join(wanted)} FROM "{table}"').to_arrow_table()
    finally:
        src.close()
    con.register("ev_source", data)
    try:
        _run_insert(con, "ev_source", columns["event_time"], "price" in columns, window)
    finally:
        con.unregister("ev_source")
    return "price" in columns


def _from_mysql(con: duckdb.DuckDBPyConnection, url: str, table: str, window: dict) -> bool:
    import pymysql

    from db.load import mysql_connect

    conn = mysql_connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT lower(column_name) FROM information_schema.columns"
                " WHERE table_schema = DATABASE() AND table_name = %s",
                (table,),
            )
            columns = {name: "" for (name,) in cur.fetchall()}
        if not columns:
            raise DataError(f"{redact(url)}: no table {table!r} in the URL's database")
        _check_columns(columns, f"{redact(url)}: table {table}")
        price = "price" in columns
        names = [*REQUIRED_COLUMNS, *(["price"] if price else [])]
        types = [pa.timestamp("us"), pa.string(), pa.int64(), pa.int64(), pa.float64()]
        # streamed (server-side cursor) and filtered chunk by chunk: bounded memory
        with conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute(
                f"SELECT {', '.join(names)} FROM `{table}`"
                " WHERE event_time >= %s AND event_time < %s AND event_type IN %s",
                (window["since"], window["until"], EVENT_TYPES),
            )
            while rows := cur.fetchmany(_CHUNK_ROWS):
                by_column = zip(*rows, strict=True)
                data = pa.table(
                    {
                        n: pa.array([_plain(v) for v in col], type=t)
                        for n, col, t in zip(names, by_column, types, strict=False)
                    }
                )
                con.register("ev_source", data)
                try:
                    _run_insert(con, "ev_source", "TIMESTAMP", price, window)
                finally:
                    con.unregister("ev_source")
    except pymysql.MySQLError as exc:
        raise DataError(f"{redact(url)}: cannot read table {table} ({exc})") from exc
    finally:
        conn.close()
    return price


_CHUNK_ROWS = 100_000


def _plain(value: Any) -> Any:
    """DECIMAL prices arrive as decimal.Decimal: a float is all a revenue sum needs."""
    return float(value) if type(value).__name__ == "Decimal" else value
