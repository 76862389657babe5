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

    python bench/bench_udf.py --in-server [--rows 1000000] [--runs 3]

In-server scoring (issue 13) over a --rows table of random (user, product) pairs of a
random 64-dim model (200,000 users, 20,000 items), 1 session and 2 concurrent
sessions: the loadable function called directly, the will_purchase wrapper, the
same wrapper shape around a trivial built-in expression (MariaDB's stored-function
ceiling), the HTTP path (on the first --http-rows rows: it is ~4,000 rows/s),
DuckDB's function over HTTP, and `recsql score --in-server` into a table.

    python bench/bench_udf.py --rss [--users 3000000 --items 200000 --dim 64]

The mariadbd process's resident set before and after mapping a vectors file of
that size, and with 2 sessions scoring from it (needs the server on this machine).
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

from _recsql import random_history_model, random_mfblock, serving  # noqa: E402

from db.functions import WILL_PURCHASE  # noqa: E402
from db.load import mysql_connect  # noqa: E402
from db.mysql_udf import (  # noqa: E402
    Endpoint,
    Vectors,
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


def sessions_rate(url: str, sql: str, rows: int, runs: int, sessions: int) -> float:
    """Median rows/s per session with `sessions` connections running `sql` at once."""
    conns = [mysql_connect(url) for _ in range(sessions)]
    try:
        with conns[0].cursor() as cur:  # warm: the first statement maps the file
            cur.execute(sql)
            cur.fetchall()
        rates = []
        for _ in range(runs):
            times = [0.0] * sessions
            barrier = threading.Barrier(sessions)

            def run(k: int, barrier: threading.Barrier = barrier, times: list = times) -> None:
                with conns[k].cursor() as cur:
                    barrier.wait()
                    start = time.perf_counter()
                    cur.execute(sql)
                    cur.fetchall()
                    times[k] = time.perf_counter() - start

            threads = [threading.Thread(target=run, args=(k,)) for k in range(sessions)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates.append(rows / max(times))
        return statistics.median(rates)
    finally:
        for c in conns:
            c.close()


def duckdb_sessions_rate(cursors: list, sql: str, rows: int, runs: int) -> float:
    """Median rows/s per DuckDB cursor with all of them running `sql` at once."""
    rates = []
    for _ in range(runs):
        times = [0.0] * len(cursors)

        def run(k: int, times: list = times) -> None:
            start = time.perf_counter()
            cursors[k].execute(sql).fetchall()
            times[k] = time.perf_counter() - start

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(cursors))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates.append(rows / max(times))
    return statistics.median(rates)


def in_server(args: argparse.Namespace) -> list[str]:
    import duckdb
    from bench_db import median_rate

    from db.duckdb_udf import install_duckdb_functions
    from db.http import Endpoints
    from db.score import ScoreOptions, score_mysql_in_server
    from db.vectors import export_vectors

    users, items, rows, runs = 200_000, 20_000, args.rows, args.runs
    http_rows = min(args.http_rows, rows)
    database = f"recsql_bench_{uuid.uuid4().hex[:8]}"
    admin = mysql_connect(args.mysql_url)
    base = args.mysql_url.rsplit("/", 1)[0]
    url = f"{base}/{database}"
    tmp = Path(tempfile.mkdtemp(prefix="recsql-bench-"))
    tmp.chmod(0o755)  # the server's user reads the vectors file
    names = ["bench-vec", "bench-small", "bench-http", "bench-hist"]
    allow_list = None
    out = [
        f"## In-server scoring on MariaDB (bench_udf.py --in-server, {rows:,} pairs)\n",
        f"Random 64-dim model, {users:,} users x {items:,} items; pairs drawn uniformly "
        "(~2% unknown ids). rows/s per session, median of "
        f"{runs} runs; 2 sessions run the same statement at once.\n",
        "| path | SQL | 1 session | 2 sessions (each) |",
        "|---|---|---:|---:|",
    ]
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{database}`")
            cur.execute(f"USE `{database}`")
            cur.execute(
                "CREATE TABLE pairs (k INT PRIMARY KEY, u BIGINT NOT NULL, p BIGINT NOT NULL)"
            )
            # ids 0..n-1 are known; a few past the end are unknown
            cur.execute(
                "INSERT INTO pairs SELECT seq, (seq * 2654435761) %% %s, (seq * 40503) %% %s "
                f"FROM seq_1_to_{rows}",
                (int(users * 1.02), int(items * 1.02)),
            )
        model_dir = random_mfblock(tmp / "model", np.arange(users), np.arange(items), 64)
        info = export_vectors(model_dir, tmp / "bench.vectors")
        out.insert(2, f"Vectors file {info.bytes / 1e6:,.0f} MB.\n")
        fn = replace(WILL_PURCHASE, endpoint="bench-vec")
        # a small model too (500 users x 200 items, 8-dim: it stays in the CPU caches), so
        # the wrapper's own cost shows apart from the big model's cache misses
        small_dir = random_mfblock(tmp / "small", np.arange(500), np.arange(200), 8)
        small = export_vectors(small_dir, tmp / "small.vectors")
        small_fn = replace(WILL_PURCHASE, name="will_purchase_small", endpoint="bench-small")
        # a history model of the same size: user vectors from events, and the repeat term's
        # bonus on each user's products (last 200 events, ~30 a user, heavy-tailed)
        history_dir = random_history_model(tmp / "history", np.arange(users), np.arange(items))
        history = export_vectors(history_dir, tmp / "history.vectors")
        out.insert(
            3,
            f"History model: {history.bytes / 1e6:,.0f} MB, {history.bonus_pairs:,} (user, product)"
            f" pairs with a repeat bonus ({history.bonus_pairs / users:.1f} a user).\n",
        )
        entries = {
            "bench-vec": Vectors(info.path),
            "bench-small": Vectors(small.path),
            "bench-hist": Vectors(history.path),
        }
        allow_list = install_udf(admin, entries, [fn, small_fn], so_path=build_udf())
        create_functions(admin, [fn, small_fn], strict=True)
        with admin.cursor() as cur:
            cur.execute(
                "CREATE FUNCTION bench_trivial(user_id BIGINT, product_id BIGINT) RETURNS FLOAT "
                "NOT DETERMINISTIC NO SQL RETURN (user_id + product_id) * 1e-9"
            )
            # the same with a loadable function that does nothing (recsql_last_error: a
            # thread-local flag): what MariaDB charges per row for any UDF in a wrapper
            cur.execute(
                "CREATE FUNCTION bench_trivial_udf(user_id BIGINT, product_id BIGINT) RETURNS "
                "FLOAT NOT DETERMINISTIC NO SQL RETURN (user_id + product_id) * 1e-9 + "
                "COALESCE(LENGTH(recsql_last_error()), 0)"
            )
        cases = [
            ("no function (scan + SUM)", "SUM(u + p)", rows),
            ("in-server, direct", "SUM(recsql_invoke('bench-vec', u, p))", rows),
            (
                "in-server, direct, history model (the default now)",
                "SUM(recsql_invoke('bench-hist', u, p))",
                rows,
            ),
            ("in-server, wrapper", "SUM(will_purchase(u, p))", rows),
            ("trivial wrapper (ceiling)", "SUM(bench_trivial(u, p))", rows),
            ("trivial wrapper + a no-op loadable function", "SUM(bench_trivial_udf(u, p))", rows),
            (
                "in-server, direct, small model",
                "SUM(recsql_invoke('bench-small', u % 500, p % 200))",
                rows,
            ),
            ("in-server, wrapper, small model", "SUM(will_purchase_small(u % 500, p % 200))", rows),
            ("trivial wrapper, same arguments", "SUM(bench_trivial(u % 500, p % 200))", rows),
        ]
        for label, expr, n in cases:
            sql = f"SELECT {expr} FROM pairs"
            one = sessions_rate(url, sql, n, runs, 1)
            two = sessions_rate(url, sql, n, runs, 2)
            out.append(f"| {label} | `{expr}` | {one:,.0f} | {two:,.0f} |")
            print(out[-1], file=sys.stderr, flush=True)
        with serving(model_dir, 1, tmp / "serve.log") as http_url:
            write_allow_list(allow_list, {"bench-http": Endpoint(http_url)})
            expr = "SUM(recsql_invoke('bench-http', u, p))"
            sql = f"SELECT {expr} FROM pairs WHERE k <= {http_rows}"
            one = sessions_rate(url, sql, http_rows, runs, 1)
            two = sessions_rate(url, sql, http_rows, runs, 2)
            out.append(
                f"| HTTP (recsql serve, 1 worker; {http_rows:,} rows) | `{expr}` | "
                f"{one:,.0f} | {two:,.0f} |"
            )
            print(out[-1], file=sys.stderr, flush=True)
            con = duckdb.connect()
            con.execute(
                f"CREATE TABLE pairs AS SELECT (i * 2654435761) % {int(users * 1.02)} AS u, "
                f"(i * 40503) % {int(items * 1.02)} AS p FROM range(1, {rows + 1}) t(i)"
            )
            install_duckdb_functions(con, Endpoints({"recsql": http_url}))
            sql = "SELECT count(will_purchase(u, p)) FROM pairs"
            rate = median_rate(rows, lambda: con.execute(sql).fetchall(), runs)
            cursors = [con.cursor() for _ in range(2)]  # 2 sessions; they share the function
            two = duckdb_sessions_rate(cursors, sql, rows, runs)
            out.append(
                "| DuckDB (HTTP, 2,048-row requests, 1 worker) | "
                f"`count(will_purchase(u, p))` | {rate:,.0f} | {two:,.0f} |"
            )
            for cursor in cursors:
                cursor.close()
            con.close()
        for on_error, label in (("null", "direct function"), ("error", "strict wrapper")):
            stats = [
                score_mysql_in_server(
                    url, "SELECT u, p FROM pairs", ScoreOptions(fn, "scores", on_error=on_error)
                )
                for _ in range(runs)
            ]
            rate = statistics.median(s.rows_per_s for s in stats)
            out.append(
                f"| `recsql score --in-server` (--on-error {on_error}: {label}) | "
                f"INSERT ... SELECT into InnoDB + index | {rate:,.0f} | - |"
            )
            print(out[-1], file=sys.stderr, flush=True)
        with admin.cursor() as cur:  # what the insert alone costs, without scoring
            start = time.perf_counter()
            cur.execute("CREATE TABLE copy_only (u BIGINT, p BIGINT, score FLOAT)")
            cur.execute("INSERT INTO copy_only SELECT u, p, u * 1e-9 FROM pairs")
            rate = rows / (time.perf_counter() - start)
        out.append(
            f"| INSERT ... SELECT, no function (insert ceiling) | `u * 1e-9` | {rate:,.0f} | - |"
        )
    finally:
        if allow_list:
            write_allow_list(allow_list, {}, remove=names)
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        admin.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    out.append("\nMariaDB, the endpoint and the client share the machine's cores.")
    return out


def _status_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0])
    return fields


def rss(args: argparse.Namespace) -> list[str]:
    """mariadbd's resident set as a big vectors file is mapped and scored from."""
    from db.vectors import write_vectors
    from model import IdIndex, Recommender

    admin = mysql_connect(args.mysql_url)
    with admin.cursor() as cur:
        cur.execute("SELECT @@pid_file, @@datadir")
        pid_file, datadir = (v.decode() if isinstance(v, bytes) else v for v in cur.fetchone())
    pid_path = Path(pid_file) if os.path.isabs(pid_file) else Path(datadir) / pid_file
    pid = int(pid_path.read_text().split()[0])
    tmp = Path(tempfile.mkdtemp(prefix="recsql-rss-"))
    tmp.chmod(0o755)
    database = f"recsql_bench_{uuid.uuid4().hex[:8]}"
    url = f"{args.mysql_url.rsplit('/', 1)[0]}/{database}"
    rng = np.random.default_rng(0)
    n_u, n_i, dim = args.users, args.items, args.dim
    rec = Recommender(
        user_vectors=rng.random((n_u, dim), dtype=np.float32),
        item_vectors=rng.random((n_i, dim), dtype=np.float32),
        users=IdIndex(np.arange(n_u, dtype=np.int64) * 3 + 1),
        items=IdIndex(np.arange(n_i, dtype=np.int64) * 5 + 2),
    )
    start = time.perf_counter()
    info = write_vectors(rec, tmp / "big.vectors")
    written = time.perf_counter() - start
    del rec
    # cold start: the file leaves the page cache, so the server reads (and is charged) it
    fd = os.open(info.path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    allow_list = None
    out = [
        f"## mariadbd memory with a {n_u:,}-user, {n_i:,}-item, {dim}-dim model "
        f"(bench_udf.py --rss){' ' + args.note if args.note else ''}\n",
        f"Vectors file {info.bytes / 2**20:,.0f} MiB (vectors {(n_u + n_i) * dim * 4 / 2**20:,.0f} "
        f"MiB, id hash indexes the rest), written in {written:.1f} s.\n",
        "| step | VmRSS MiB | RssFile MiB | RssAnon MiB | seconds |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(label: str, seconds: float | None = None) -> None:
        kb = _status_kb(pid)
        out.append(
            f"| {label} | {kb['VmRSS'] / 1024:,.0f} | {kb['RssFile'] / 1024:,.0f} | "
            f"{kb['RssAnon'] / 1024:,.0f} | {'' if seconds is None else f'{seconds:.2f}'} |"
        )
        print(out[-1], file=sys.stderr, flush=True)

    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{database}`")
            cur.execute(f"USE `{database}`")
            cur.execute("CREATE TABLE pairs (u BIGINT NOT NULL, p BIGINT NOT NULL)")
            cur.execute(
                "INSERT INTO pairs SELECT seq * 3 + 1, ((seq * 40503) %% %s) * 5 + 2 "
                "FROM seq_0_to_%s",
                (n_i, n_u - 1),
            )
        allow_list = install_udf(admin, {"bench-rss": Vectors(info.path)}, [], so_path=build_udf())
        row("before the first call")
        with admin.cursor() as cur:
            start = time.perf_counter()
            cur.execute("SELECT recsql_invoke('bench-rss', 1, 2)")
            cur.fetchall()
            row("first call (map + checksum)", time.perf_counter() - start)
            start = time.perf_counter()
            cur.execute("SELECT SUM(recsql_invoke('bench-rss', u, p)) FROM pairs")
            cur.fetchall()
            row(f"scored every user once ({n_u:,} rows)", time.perf_counter() - start)
        seconds = sessions_rate(
            url, "SELECT SUM(recsql_invoke('bench-rss', u, p)) FROM pairs", n_u, 1, 2
        )
        row(f"2 sessions, same scan at once ({seconds:,.0f} rows/s each)")
    finally:
        if allow_list:
            write_allow_list(allow_list, {}, remove=["bench-rss"])
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        admin.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    parser.add_argument("--in-server", action="store_true", help="in-server scoring (issue 13)")
    parser.add_argument("--http-rows", type=int, default=20_000, help="--in-server: HTTP rows")
    parser.add_argument("--rss", action="store_true", help="mariadbd RSS with a large model")
    parser.add_argument("--users", type=int, default=3_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--note", default="", help="--rss: added to the heading")
    args = parser.parse_args()
    if args.in_server:
        if args.rows == 20_000:
            args.rows = 2_000 if args.quick else 1_000_000
        args.runs = 1 if args.quick else args.runs
        print("\n".join(in_server(args)))
        return 0
    if args.rss:
        print("\n".join(rss(args)))
        return 0
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
