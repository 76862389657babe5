"""Rows/s of DuckDB function scoring, the event loaders and `recsql score`.

    python bench/bench_db.py [--rows 2000000] [--events 1000000] [--runs 3] [--quick]

- DuckDB function: `SELECT count(will_purchase(u, p)) FROM pairs` (2,048-row chunks,
  one HTTP request each) against recsql's own server (`recsql serve`, --workers
  gevent workers) on a random-weight MFBlock. Target: >= 500,000 rows/s.
- Loaders: REES46-shaped .csv.gz events into DuckDB and into MariaDB/MySQL
  (RECSQL_TEST_MYSQL_URL, default mysql://root@127.0.0.1:3306/test; skipped if
  unreachable).
- `recsql score`: all user x product pairs of the loaded data, into a scores table,
  on both engines.
Prints a markdown section with the median of --runs runs. (MariaDB's loadable
function is measured by bench_udf.py.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import duckdb
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _recsql import random_mfblock, serving  # noqa: E402

from db.duckdb_udf import install_duckdb_functions  # noqa: E402
from db.http import Endpoints  # noqa: E402
from db.load import load_events_duckdb, load_events_mysql, mysql_connect  # noqa: E402
from db.score import ScoreOptions, score_duckdb, score_mysql  # noqa: E402
from tests.db.rees46_files import event_lines, write_events  # noqa: E402

USERS, PRODUCTS, EMB = 20_000, 2_000, 32


@contextlib.contextmanager
def recsql_server(tmp: Path, workers: int) -> Iterator[str]:
    """recsql serve on a random MFBlock over the ids event_lines() writes."""
    model_dir = random_mfblock(
        tmp / "model", np.arange(USERS) + 500_000_000, np.arange(PRODUCTS) + 1_000_000, EMB
    )
    with serving(model_dir, workers, tmp / "serve.log") as url:
        yield url


def median_rate(rows: int, fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


@contextlib.contextmanager
def mysql_database() -> Iterator[str | None]:
    """URL of a scratch database on the test server (dropped after), or None."""
    url = os.environ.get("RECSQL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
    try:
        admin = mysql_connect(url, connect_timeout=3)
    except Exception:  # any reason: report the MySQL rows as skipped
        yield None
        return
    name = f"recsql_bench_{os.getpid()}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="pairs for the DuckDB function")
    parser.add_argument("--events", type=int, default=1_000_000, help="events for the loaders")
    parser.add_argument("--score-users", type=int, default=1000, help="users x all products")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.events, args.score_users, args.runs = 200_000, 100_000, 100, 1
    lines: list[str] = []
    with (
        tempfile.TemporaryDirectory() as tmp_name,
        recsql_server(Path(tmp_name), args.workers) as url,
    ):
        tmp = Path(tmp_name)
        endpoints = Endpoints({"recsql": url})
        con = duckdb.connect()
        install_duckdb_functions(con, endpoints)
        con.execute(
            f"CREATE TABLE pairs AS SELECT 500000000 + i % {USERS} AS u, "
            f"1000000 + (i * 7) % {PRODUCTS} AS p FROM range({args.rows}) t(i)"
        )
        query = "SELECT count(will_purchase(u, p)) FROM pairs"
        rate = median_rate(args.rows, lambda: con.execute(query).fetchall(), args.runs)
        lines.append(f"| DuckDB `will_purchase` over HTTP | {args.rows:,} | {rate:,.0f} |")

        events = write_events(
            tmp / "events.csv.gz", event_lines(args.events, users=USERS, products=PRODUCTS)
        )
        rate = median_rate(args.events, lambda: load_events_duckdb(con, [events]), args.runs)
        lines.append(f"| load events into DuckDB (.csv.gz) | {args.events:,} | {rate:,.0f} |")

        pairs_sql = (
            f"SELECT u.user_id, p.product_id FROM (SELECT user_id FROM users ORDER BY "
            f"user_id LIMIT {args.score_users}) u CROSS JOIN products p"
        )
        n_pairs = con.execute(f"SELECT count(*) FROM ({pairs_sql})").fetchall()[0][0]
        opts = ScoreOptions(progress=False)
        rate = median_rate(
            n_pairs, lambda: score_duckdb(con, pairs_sql, endpoints, opts), args.runs
        )
        lines.append(f"| `recsql score`, DuckDB | {n_pairs:,} | {rate:,.0f} |")
        con.close()

        with mysql_database() as url_mysql:
            if url_mysql is None:
                lines.append("| MariaDB loader and `recsql score` | - | skipped: no server |")
            else:
                rate = median_rate(
                    args.events, lambda: load_events_mysql(url_mysql, [events]), args.runs
                )
                lines.append(
                    f"| load events into MariaDB (.csv.gz) | {args.events:,} | {rate:,.0f} |"
                )
                rate = median_rate(
                    n_pairs, lambda: score_mysql(url_mysql, pairs_sql, endpoints, opts), args.runs
                )
                lines.append(f"| `recsql score`, MariaDB | {n_pairs:,} | {rate:,.0f} |")
    print(
        f"## SQL engines (bench_db.py)\n\nrecsql server: {args.workers} gevent worker(s), "
        f"random MFBlock {USERS:,} users x {PRODUCTS:,} products, emb {EMB}; median of "
        f"{args.runs} run(s).\n"
    )
    print("| what | rows | rows/s |\n|---|---:|---:|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
