"""`recsql demo`: the main job, end to end, on embedded defaults.

events (synthetic, or files you name) -> train MFBlock on CPU -> start the
server on loopback -> load the events into DuckDB (or MySQL with
RECSQL_MYSQL_URL) -> create the SQL functions -> run the example queries ->
stop the server. On MySQL/MariaDB the functions score inside the server from
the model's vectors file (db/vectors.py); --http makes them call the server.
Training and serving run as `recsql` subprocesses: db/ talks to them the way
a user would, over the CLI and HTTP.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import duckdb

from db.duckdb_udf import install_duckdb_functions
from db.functions import DEFAULT_FUNCTIONS
from db.http import Endpoints
from db.load import load_events_duckdb, load_events_mysql, mysql_connect
from db.queries import EXAMPLES, print_table, run_example_query
from db.score import ScoreOptions, score_duckdb
from model.errors import RecsqlError

# `recsql train` defaults (softmax, early stopping, refit) but capped so the demo stays quick
TRAIN_FLAGS = ["--epochs", "2"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("events", nargs="*", type=Path, help="REES46 event files (default: synthetic)")
    p.add_argument("--workdir", type=Path, default=Path("out/demo"), help="default ./out/demo")
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic events (default 1M)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument(
        "--mysql-url",
        default=os.environ.get("RECSQL_MYSQL_URL"),
        help="use MySQL/MariaDB instead of DuckDB (default $RECSQL_MYSQL_URL)",
    )
    p.add_argument(
        "--http",
        action="store_true",
        help="MySQL/MariaDB: score over HTTP through the server, as Aurora does, instead of "
        "inside the database from the model's vectors file (the default)",
    )


class _Steps:
    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.monotonic()

    def __call__(self, text: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {text}  (+{time.monotonic() - self.t0:.0f}s)", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    logging.getLogger("db").setLevel(logging.WARNING)  # the demo prints its own summaries
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    engine = "mysql" if args.mysql_url else "duckdb"
    step = _Steps(6)

    step("events")
    events = list(args.events)
    if not events:
        events = [work / "events.csv"]
        if not events[0].exists():
            _recsql("synth", "--rows", str(args.rows), "--out", str(events[0]), "--seed", "7")
        else:
            print(f"reusing {events[0]}")

    step("train MFBlock on CPU")
    model_dir = work / "model"
    _recsql(
        "train", *map(str, events), "--model-dir", str(model_dir), "--device", "cpu", *TRAIN_FLAGS
    )

    step("start the server on loopback")
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(model_dir, port, work / "server.log")
    try:
        step(f"load the events into {engine}")
        if engine == "duckdb":
            con = duckdb.connect(str(work / "recsql.duckdb"))
            print(load_events_duckdb(con, events).summary())
            step("create the SQL functions")
            names = install_duckdb_functions(con, {"recsql": url}, DEFAULT_FUNCTIONS)
            print(f"DuckDB functions: {', '.join(names)} -> endpoint recsql = {url}")
            stats = score_duckdb(
                con,
                "SELECT u.user_id, p.product_id FROM (SELECT user_id FROM users ORDER BY "
                "n_events DESC LIMIT 200) u CROSS JOIN products p",
                Endpoints({"recsql": url}),
                ScoreOptions(progress=False),
            )
            print(f"recsql score: {stats.summary()}")
        else:
            print(load_events_mysql(args.mysql_url, events).summary())
            step("create the SQL functions")
            con = _install_mysql(args, model_dir, url)
        step("run the example SQL")
        _run_examples(engine, con)
    finally:
        _stop_server(server)
    print(f"\ndone. Model: {model_dir}  Server log: {work / 'server.log'}")
    return 0


def _install_mysql(args: argparse.Namespace, model_dir: Path, url: str) -> Any:
    """will_purchase on MySQL/MariaDB: scored in-server from the model's vectors file, or
    (--http) by the loadable function calling the server; returns a connection."""
    from db.mysql_udf import install_in_server, install_mysql_functions

    if args.http:
        print(install_mysql_functions(args.mysql_url, DEFAULT_FUNCTIONS, {"recsql": url}))
        print(f"will_purchase scores over HTTP: endpoint recsql = {url}")
        return mysql_connect(args.mysql_url)
    vectors = (args.workdir / "model.vectors").absolute()
    print(install_in_server(args.mysql_url, DEFAULT_FUNCTIONS, model_dir, vectors))
    print("will_purchase scores inside the server (no HTTP); `recsql demo --http` calls the server")
    con = mysql_connect(args.mysql_url)
    with con.cursor() as cur:  # a server that cannot read the file says why: stop here
        cur.execute("SELECT recsql_invoke('recsql', 0, 0) IS NULL, recsql_last_error()")
        (_, error) = cur.fetchone()
    if error:
        error = error.decode() if isinstance(error, bytes) else error
        raise RecsqlError(f"in-server scoring failed: {error} (or run the demo with --http)")
    return con


def _run_examples(engine: str, con: Any) -> None:
    user = _demo_user(engine, con)
    for name, query in EXAMPLES.items():
        if name == "scores_by_brand" and engine != "duckdb":
            continue
        params = {"user_id": user, "users": 5}
        print(f"\n-- {query.title}\n{query.literal(params)};")
        columns, rows = run_example_query(engine, con, name, params)
        print_table(columns, rows)


def _demo_user(engine: str, con: Any) -> int:
    """An active user with carted-but-not-bought products: a good candidate list."""
    sql = "SELECT user_id FROM users WHERE n_carts > 0 ORDER BY n_events DESC, user_id LIMIT 1"
    if engine == "duckdb":
        return int(con.execute(sql).fetchall()[0][0])
    with con.cursor() as cur:
        cur.execute(sql)
        return int(cur.fetchall()[0][0])


def _recsql(*argv: str) -> None:
    cmd = [sys.executable, "-m", "recsql_cli", *argv]
    print("$ recsql " + " ".join(argv), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise RecsqlError(f"`recsql {argv[0]}` failed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    argv = [
        "serve",
        "--model-dir",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    print("$ recsql " + " ".join(argv) + f"  (log: {log})", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsql_cli", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RecsqlError(f"the server exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    print(f"server ready at http://127.0.0.1:{port} (pid {proc.pid})")
                    return proc
        except OSError:
            pass
        time.sleep(0.3)
    _stop_server(proc)
    raise RecsqlError(f"the server did not answer /ping within 120 s; see {log}")


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
        print(f"\nserver stopped (exit {proc.returncode})")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print("\nserver killed after 30 s")
