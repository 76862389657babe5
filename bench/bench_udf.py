"""Rows/s of the MariaDB/MySQL loadable function, one session, row at a time over HTTP.

    python bench/bench_udf.py [--rows 20000] [--runs 3] [--url URL] [--no-recsql] [--quick]

Times `SELECT SUM(will_purchase(u, p)) FROM pairs` (the SQL wrapper, a stored
function: MariaDB runs the UDF's init/deinit per row) and the same through
`recsql_invoke('<endpoint>', u, p)` directly, against:
  - a stdlib http.server stand-in (score = (u * 31 + p) % 97 / 97), the floor
    a Python endpoint sets;
  - recsql's own server (`python -m serve`, 1 gevent worker) on a small random
    MFBlock artifact, unless --no-recsql;
  - --url URL, when given (any SageMaker-style endpoint).
Prints a markdown section with the median of --runs runs. Target: >= 4,000 rows/s
against recsql's server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _recsql import random_mfblock, serving  # noqa: E402

from db.functions import WILL_PURCHASE  # noqa: E402
from db.load import mysql_connect  # noqa: E402
from db.mysql_udf import (  # noqa: E402
    Endpoint,
    build_udf,
    create_functions,
    install_udf,
    write_allow_list,
)

USERS, PRODUCTS, EMB = 2_000, 5_000, 32


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # one segment per reply: unbuffered, Nagle + delayed ACK cost 40 ms

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reply = b"".join(
            repr((int(u) * 31 + int(p)) % 97 / 97).encode() + b"\n"
            for u, p in (line.split(b",") for line in body.splitlines())
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@contextlib.contextmanager
def stdlib_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def recsql_server(tmp: Path) -> Iterator[str]:
    model_dir = random_mfblock(tmp / "model", np.arange(USERS), np.arange(PRODUCTS), EMB)
    with serving(model_dir, 1, tmp / "serve.log") as url:
        yield url


def timed(conn, sql: str, runs: int) -> float:
    times = []
    with conn.cursor() as cur:
        for _ in range(runs):
            start = time.perf_counter()
            cur.execute(sql)
            cur.fetchall()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_endpoint(conn, name: str, url: str, rows: int, runs: int, allow_list: Path) -> list[str]:
    write_allow_list(allow_list, {"bench": Endpoint(url)})
    lines = []
    for label, sql in (
        ("will_purchase (stored function)", "SUM(will_purchase(u, p))"),
        ("recsql_invoke (direct UDF)", "SUM(recsql_invoke('bench', u, p))"),
    ):
        seconds = timed(conn, f"SELECT {sql} FROM pairs", runs)
        lines.append(f"| {name} | {label} | {rows:,} | {rows / seconds:,.0f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--url", help="also measure this endpoint (http://host:port)")
    parser.add_argument("--no-recsql", action="store_true", help="skip recsql's own server")
    parser.add_argument(
        "--mysql-url",
        default=os.environ.get("RECSQL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
    )
    parser.add_argument("--quick", action="store_true", help="2,000 rows, 1 run")
    args = parser.parse_args()
    rows, runs = (2_000, 1) if args.quick else (args.rows, args.runs)

    database = f"recsql_bench_{uuid.uuid4().hex[:8]}"
    conn = mysql_connect(args.mysql_url)
    fn = replace(WILL_PURCHASE, endpoint="bench")
    allow_list = None
    out = [
        "## MariaDB loadable function (one session, row at a time)\n",
        "| endpoint | SQL | rows | rows/s |",
        "|---|---|---:|---:|",
    ]
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{database}`")
            cur.execute(f"USE `{database}`")
            cur.execute("CREATE TABLE pairs (u BIGINT NOT NULL, p BIGINT NOT NULL)")
            rng = np.random.default_rng(1)
            pairs = np.stack([rng.integers(0, USERS, rows), rng.integers(0, PRODUCTS, rows)], 1)
            cur.executemany("INSERT INTO pairs VALUES (%s, %s)", pairs.tolist())
        with stdlib_server() as url:
            allow_list = install_udf(conn, {"bench": url}, [fn], so_path=build_udf())
            create_functions(conn, [fn], strict=False)
            out += bench_endpoint(conn, "stdlib http.server", url, rows, runs, allow_list)
        if args.url:
            out += bench_endpoint(conn, args.url, args.url, rows, runs, allow_list)
        if not args.no_recsql:
            with tempfile.TemporaryDirectory() as tmp, recsql_server(Path(tmp)) as url:
                out += bench_endpoint(
                    conn, "recsql serve (1 gevent worker)", url, rows, runs, allow_list
                )
    finally:
        if allow_list:
            write_allow_list(allow_list, {}, remove=["bench"])
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        conn.close()
    out.append(f"\nMedian of {runs} run(s); MariaDB and the endpoint share this machine's CPUs.")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
