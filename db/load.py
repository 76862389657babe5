"""Load REES46 event files into DuckDB or MySQL/MariaDB: tables events, users, products.

DuckDB reads and normalises the CSVs (.csv or .csv.gz) once; from there
- DuckDB: the three tables are replaced in one transaction;
- MySQL: DuckDB writes one CSV per table, `LOAD DATA LOCAL INFILE` fills
  `<table>__new` staging tables, indexes are built after the load (faster than
  maintaining them row by row), and one `RENAME TABLE` swaps all three in.

A load is the set of files given: re-running replaces the tables (never
appends), so there are no duplicates, and a failure leaves the previous tables
untouched. Rows without a user, product, event type or parsable time are
skipped and counted; a file that is not REES46-shaped fails the load.

    events   (event_time, event_type, product_id, user_id, user_session, price)
    users    (user_id PK, n_events, n_views, n_carts, n_purchases, first_seen, last_seen)
    products (product_id PK, category_id, category_code, brand, price, n_events, n_purchases)
             category/brand/price: from the product's latest event that has them
"""

from __future__ import annotations

import gzip
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import duckdb

from model.errors import BadRequest, DataError, first_line

log = logging.getLogger(__name__)

HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
)
EVENT_TYPES = ("view", "cart", "remove_from_cart", "purchase")
TABLES = ("events", "users", "products")
FILE_COLUMNS = {
    "event_time": "VARCHAR",
    "event_type": "VARCHAR",
    "product_id": "BIGINT",
    "category_id": "BIGINT",
    "category_code": "VARCHAR",
    "brand": "VARCHAR",
    "price": "DECIMAL(12,2)",
    "user_id": "BIGINT",
    "user_session": "VARCHAR",
}


@dataclass
class LoadStats:
    engine: str
    files: int
    rows_read: int
    events: int
    users: int
    products: int
    skipped: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"loaded {self.events:,} events ({self.users:,} users, {self.products:,} products) "
            f"from {self.files} file(s) into {self.engine} in {self.seconds:.1f} s: "
            f"{self.rows_per_s:,.0f} rows/s; {self.skipped:,} rows skipped"
        )


# ----------------------------------------------------------------------- reading


def check_event_files(paths: Iterable[str | Path]) -> list[Path]:
    """Existing, de-duplicated REES46 files (header checked), in the order given."""
    seen: dict[Path, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise DataError(f"{path}: no such event file")
        seen.setdefault(path.resolve(), path)
    if not seen:
        raise BadRequest("no event files given")
    for path in seen.values():
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
                first = fh.readline().strip().lstrip("\ufeff")
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read ({exc})") from exc
        if first.replace('"', "") != HEADER:
            raise DataError(f"{path}: not a REES46 event file; the header must be {HEADER}")
    return list(seen.values())


_NORMALISED = f"""
SELECT
    try_strptime(regexp_replace(trim(event_time), ' UTC$', ''), '%Y-%m-%d %H:%M:%S') AS event_time,
    lower(trim(event_type)) AS event_type,
    product_id, category_id,
    nullif(trim(category_code), '') AS category_code,
    nullif(trim(brand), '') AS brand,
    price, user_id,
    nullif(trim(user_session), '') AS user_session
FROM read_csv($paths, header = true, auto_detect = false, columns = {FILE_COLUMNS!r},
              quote = '"', escape = '"', delim = ',', null_padding = true)
"""

_VALID = (
    "event_time IS NOT NULL AND user_id IS NOT NULL AND product_id IS NOT NULL "
    f"AND event_type IN {EVENT_TYPES!r}"
)

_EVENTS = f"""
SELECT event_time, event_type, product_id, user_id, user_session, price
FROM _recsql_staged WHERE {_VALID} ORDER BY user_id, event_time
"""
_USERS = f"""
SELECT user_id, count(*) AS n_events,
       count(*) FILTER (WHERE event_type = 'view') AS n_views,
       count(*) FILTER (WHERE event_type = 'cart') AS n_carts,
       count(*) FILTER (WHERE event_type = 'purchase') AS n_purchases,
       min(event_time) AS first_seen, max(event_time) AS last_seen
FROM _recsql_staged WHERE {_VALID} GROUP BY user_id ORDER BY user_id
"""
# arg_max skips NULL values: each attribute comes from the latest event that has one.
_PRODUCTS = f"""
SELECT product_id,
       arg_max(category_id, event_time) AS category_id,
       arg_max(category_code, event_time) AS category_code,
       arg_max(brand, event_time) AS brand,
       arg_max(price, event_time) AS price,
       count(*) AS n_events,
       count(*) FILTER (WHERE event_type = 'purchase') AS n_purchases
FROM _recsql_staged WHERE {_VALID} GROUP BY product_id ORDER BY product_id
"""


def _stage(con: duckdb.DuckDBPyConnection, files: list[Path], temp: bool = True) -> int:
    """Parse the files once into the table _recsql_staged; return rows read."""
    kind = "TEMP TABLE" if temp else "TABLE"
    try:
        con.execute(
            f"CREATE OR REPLACE {kind} _recsql_staged AS {_NORMALISED}",
            {"paths": [str(p) for p in files]},
        )
    except duckdb.Error as exc:
        raise DataError(f"cannot read the event files: {first_line(exc)}") from exc
    return con.execute("SELECT count(*) FROM _recsql_staged").fetchall()[0][0]


# ------------------------------------------------------------------------ DuckDB


def load_events_duckdb(con: duckdb.DuckDBPyConnection, paths: Iterable[str | Path]) -> LoadStats:
    """Replace events/users/products in `con`'s database with the given files' events."""
    start = time.perf_counter()
    files = check_event_files(paths)
    rows = _stage(con, files)
    con.execute("BEGIN TRANSACTION")
    try:
        for table, query in zip(TABLES, (_EVENTS, _USERS, _PRODUCTS), strict=True):
            con.execute(f"CREATE OR REPLACE TABLE {table} AS {query}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.execute("DROP TABLE IF EXISTS _recsql_staged")
    counts = [con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES]
    stats = LoadStats(
        "duckdb", len(files), rows, *counts, rows - counts[0], time.perf_counter() - start
    )
    log.info("%s", stats.summary())
    return stats


# ------------------------------------------------------------------------- MySQL


def mysql_connect(url: str, **kwargs: Any) -> Any:
    """`mysql://user:password@host:port/database` -> a PyMySQL connection."""
    import pymysql

    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb", "mysql+pymysql") or not parts.hostname:
        raise BadRequest(f"bad MySQL URL {url!r}: expected mysql://user[:password]@host[:port]/db")
    database = parts.path.lstrip("/") or None
    try:
        return pymysql.connect(
            host=parts.hostname,
            port=parts.port or 3306,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=database,
            charset="utf8mb4",
            autocommit=True,
            **kwargs,
        )
    except pymysql.MySQLError as exc:
        raise BadRequest(f"cannot connect to {parts.hostname}:{parts.port or 3306}: {exc}") from exc


_MYSQL_DDL = {
    "events": """(
        event_time DATETIME NOT NULL, event_type VARCHAR(16) NOT NULL,
        product_id BIGINT NOT NULL, user_id BIGINT NOT NULL,
        user_session VARCHAR(128) NULL, price DECIMAL(12,2) NULL)""",
    "users": """(
        user_id BIGINT NOT NULL PRIMARY KEY, n_events INT NOT NULL, n_views INT NOT NULL,
        n_carts INT NOT NULL, n_purchases INT NOT NULL,
        first_seen DATETIME NOT NULL, last_seen DATETIME NOT NULL)""",
    "products": """(
        product_id BIGINT NOT NULL PRIMARY KEY, category_id BIGINT NULL,
        category_code VARCHAR(255) NULL, brand VARCHAR(255) NULL, price DECIMAL(12,2) NULL,
        n_events INT NOT NULL, n_purchases INT NOT NULL)""",
}
# Built after the load; the example queries (db/queries) rely on them.
_MYSQL_INDEXES = {
    "events": "ADD INDEX ix_events_user (user_id, event_type, product_id), "
    "ADD INDEX ix_events_product (product_id)",
    "users": "ADD INDEX ix_users_purchases (n_purchases)",
    "products": "ADD INDEX ix_products_category (category_code), "
    "ADD INDEX ix_products_brand (brand)",
}
_LOAD_SQL = (
    "LOAD DATA LOCAL INFILE %s INTO TABLE `{table}__new` CHARACTER SET utf8mb4 "
    "FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' "
    "LINES TERMINATED BY '\\n'"
)


def load_events_mysql(
    url: str, paths: Iterable[str | Path], *, tmp_dir: str | None = None
) -> LoadStats:
    """Replace events/users/products in the MySQL database at `url` with the files' events."""
    start = time.perf_counter()
    files = check_event_files(paths)
    with tempfile.TemporaryDirectory(prefix="recsql-load-", dir=tmp_dir) as tmp:
        con = duckdb.connect(str(Path(tmp) / "stage.duckdb"))
        try:
            rows = _stage(con, files, temp=False)
            counts = [
                _export_csv(con, t, q, Path(tmp))
                for t, q in zip(TABLES, (_EVENTS, _USERS, _PRODUCTS), strict=True)
            ]
        finally:
            con.close()
        conn = mysql_connect(url, local_infile=True)
        try:
            _load_and_swap(conn, Path(tmp), dict(zip(TABLES, counts, strict=True)))
        finally:
            conn.close()
    stats = LoadStats(
        "mysql", len(files), rows, *counts, rows - counts[0], time.perf_counter() - start
    )
    log.info("%s", stats.summary())
    return stats


def _export_csv(con: duckdb.DuckDBPyConnection, table: str, query: str, tmp: Path) -> int:
    # NULL is written as the bare word NULL and strings always quoted: LOAD DATA with
    # ENCLOSED BY reads bare NULL as NULL and "NULL" as the string (no escape character).
    text_columns = {"events": "user_session", "products": "category_code, brand"}.get(table)
    force = f", FORCE_QUOTE ({text_columns})" if text_columns else ""
    return con.execute(
        f"COPY ({query}) TO '{tmp / (table + '.csv')}' (FORMAT csv, HEADER false, DELIMITER ',', "
        f"QUOTE '\"', ESCAPE '\"', NULLSTR 'NULL', TIMESTAMPFORMAT '%Y-%m-%d %H:%M:%S'{force})"
    ).fetchall()[0][0]


def _load_and_swap(conn: Any, tmp: Path, expected: dict[str, int]) -> None:
    import pymysql

    with conn.cursor() as cur:
        try:
            for table in TABLES:
                cur.execute(f"DROP TABLE IF EXISTS `{table}__new`, `{table}__old`")
                cur.execute(
                    f"CREATE TABLE `{table}__new` {_MYSQL_DDL[table]} "
                    "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
                )
                loaded = cur.execute(_LOAD_SQL.format(table=table), (str(tmp / f"{table}.csv"),))
                _check_load(cur, table, loaded, expected[table])
                cur.execute(f"ALTER TABLE `{table}__new` {_MYSQL_INDEXES[table]}")
            cur.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name IN (%s, %s, %s)",
                TABLES,
            )
            existing = {row[0] for row in cur.fetchall()}
            renames = [f"`{t}` TO `{t}__old`" for t in TABLES if t in existing]
            renames += [f"`{t}__new` TO `{t}`" for t in TABLES]
            cur.execute("RENAME TABLE " + ", ".join(renames))  # atomic: all three or none
        except (pymysql.MySQLError, DataError) as exc:
            for table in TABLES:
                cur.execute(f"DROP TABLE IF EXISTS `{table}__new`")
            raise DataError(f"MySQL load failed, previous tables kept: {exc}") from exc
        for table in TABLES:
            cur.execute(f"DROP TABLE IF EXISTS `{table}__old`")


def _check_load(cur: Any, table: str, loaded: int, expected: int) -> None:
    # LOAD DATA LOCAL turns bad values into warnings (truncated, NULLed, skipped rows):
    # refuse a table that is not exactly what DuckDB wrote.
    warnings = cur.connection.show_warnings() if cur.warning_count else ()
    if warnings or loaded != expected:
        detail = warnings[0][2] if warnings else f"{loaded:,} of {expected:,} rows loaded"
        raise DataError(f"{table}: {detail}")
