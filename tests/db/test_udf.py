"""The MariaDB/MySQL loadable function (db/udf) against the real server and real HTTP.

A loopback test endpoint answers text/csv by path: ok (sum of the fields), slow,
500, garbage, empty, big (a reply over the 64 KiB cap), echo (the request line
as one CSV field), target (the X-Amzn-SageMaker-Target-Model header). It counts
requests and TCP connections per mode, so tests can check that no request was
made and that keep-alive connections are reused.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pymysql
import pytest

from db.functions import Argument, SqlFunction
from db.load import mysql_connect
from db.mysql_udf import (
    Endpoint,
    allow_list_entries,
    build_udf,
    create_functions,
    function_ddl,
    install_udf,
    read_allow_list,
    write_allow_list,
)
from model.errors import DataError

SIGNAL_ERRNO = 1644  # ER_SIGNAL_EXCEPTION: SIGNAL SQLSTATE '45000'
SLOW_S = 1.0
PAIR = (Argument("user_id", "BIGINT"), Argument("product_id", "BIGINT"))


class ModeServer:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.connections: Counter[str] = Counter()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # slow replies hit closed sockets
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def total(self) -> int:
        return sum(self.requests.values())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Buffered: headers and body leave in one segment. Unbuffered, Nagle plus
            # delayed ACKs add ~40 ms to every keep-alive request.
            wbufsize = 1 << 16

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.counted = False

            def do_POST(self) -> None:  # noqa: N802
                mode = self.path.strip("/").split("/")[0]
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.requests[mode] += 1
                if not self.counted:
                    owner.connections[mode] += 1
                    self.counted = True
                status, reply = 200, b""
                line = body.decode().rstrip("\n")
                if mode == "ok":
                    reply = repr(sum(float(x) for x in line.split(","))).encode() + b"\n"
                elif mode == "slow":
                    time.sleep(SLOW_S)
                    reply = b"1\n"
                elif mode == "500":
                    status, reply = 500, b"model exploded\n"
                elif mode == "garbage":
                    reply = b"\x00\xffnot a number\n"
                elif mode == "big":
                    reply = b"1" * 70_000 + b"\n"
                elif mode == "echo":
                    reply = ('"' + line.replace('"', '""') + '"\n').encode()
                elif mode == "target":
                    reply = (self.headers.get("X-Amzn-SageMaker-Target-Model", "") + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/csv")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        return Handler


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fn(name: str, endpoint: str, returns: str = "DOUBLE", **kw: object) -> SqlFunction:
    return SqlFunction(name, PAIR, returns, endpoint=endpoint, **kw)


FUNCTIONS = [
    _fn("score_ok", "rtest-ok"),
    _fn("score_down", "rtest-down"),
    _fn("score_slow", "rtest-slow"),
    _fn("score_500", "rtest-500"),
    _fn("score_garbage", "rtest-garbage"),
    _fn("score_empty", "rtest-empty"),
    _fn("score_big", "rtest-big"),
    _fn("score_unlisted", "rtest-unlisted"),
    _fn("target_of", "rtest-target", "VARCHAR(64)", target_model="m1.tar.gz"),
]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[ModeServer]:
    server = ModeServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def udf(mysql_url: str, endpoint: ModeServer) -> Iterator[Path]:
    """Build and install the UDF with the test endpoints; yields the allow-list path."""
    url = endpoint.url
    endpoints: dict[str, object] = {
        f"rtest-{mode}": f"{url}/{mode}"
        for mode in ("ok", "500", "garbage", "empty", "big", "echo", "target", "logged")
    }
    endpoints["rtest-logged"] = f"{url}/500"
    endpoints["rtest-slow"] = Endpoint(f"{url}/slow", timeout_ms=300)
    endpoints["rtest-hang"] = Endpoint(f"{url}/slow", timeout_ms=200)
    endpoints["rtest-down"] = Endpoint(f"http://127.0.0.1:{_closed_port()}", connect_timeout_ms=300)
    conn = mysql_connect(mysql_url)
    try:
        listed = [f for f in FUNCTIONS if f.endpoint != "rtest-unlisted"]
        path = install_udf(conn, endpoints, listed, so_path=build_udf())
        names = set(allow_list_entries(endpoints, listed))
        yield path
        write_allow_list(path, {}, remove=names)
    finally:
        conn.close()


@pytest.fixture
def db(udf: Path, mysql_conn: pymysql.Connection, fresh_database: str) -> pymysql.Connection:
    """A connection to a fresh database holding the wrappers of FUNCTIONS."""
    mysql_conn.select_db(fresh_database)
    create_functions(mysql_conn, FUNCTIONS)
    return mysql_conn


def query(conn: pymysql.Connection, sql: str, args: object = None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def assert_alive(conn: pymysql.Connection) -> None:
    assert query(conn, "SELECT 1") == [(1,)]


# ------------------------------------------------------------- no server needed


def test_ddl_lenient_and_strict_wrappers() -> None:
    fn = _fn("will_purchase", "recsql", "FLOAT")
    lenient = function_ddl(fn, database="shop")
    assert lenient.startswith("CREATE FUNCTION `shop`.`will_purchase`(`user_id` BIGINT, ")
    assert "RETURN recsql_invoke('recsql', `user_id`, `product_id`)" in lenient
    strict = function_ddl(fn, strict=True)
    assert "CREATE FUNCTION `will_purchase_strict`" in strict
    assert "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = recsql_failure" in strict
    text = function_ddl(_fn("top", "recsql", "VARCHAR(200)"))
    assert "RETURNS VARCHAR(200) CHARSET utf8mb4" in text and "recsql_invoke_str(" in text


def test_ddl_refuses_types_that_would_inject_sql() -> None:
    # refused where the definition is made, before any DDL can be generated
    with pytest.raises(DataError, match="unsupported type"):
        Argument("a", "VARCHAR(10)); DROP TABLE t; --")
    fine = SqlFunction("f", (Argument("a", "VARCHAR(10)"),), "FLOAT")
    assert "`a` VARCHAR(10) CHARSET utf8mb4" in function_ddl(fine) or "VARCHAR(10)" in function_ddl(
        fine
    )


def test_allow_list_entries_and_file_round_trip(tmp_path: Path) -> None:
    fns = [_fn("a", "ep"), _fn("b", "ep", target_model="m2.tar.gz")]
    entries = allow_list_entries({"ep": Endpoint("http://127.0.0.1:8080", timeout_ms=900)}, fns)
    assert entries["ep.b"] == Endpoint("http://127.0.0.1:8080", "m2.tar.gz", 900)
    with pytest.raises(DataError, match="no URL"):
        allow_list_entries({}, fns)
    path = tmp_path / "endpoints.conf"
    path.write_text("keep http://10.0.0.1:8080\nep http://old\n")
    write_allow_list(path, entries)
    assert read_allow_list(path) == {
        "keep": "keep http://10.0.0.1:8080",
        "ep": "ep http://127.0.0.1:8080 timeout_ms=900",
        "ep.b": "ep.b http://127.0.0.1:8080 m2.tar.gz timeout_ms=900",
    }
    assert path.stat().st_mode & 0o777 == 0o644
    write_allow_list(path, {}, remove=["ep", "ep.b"])
    assert list(read_allow_list(path)) == ["keep"]
    with pytest.raises(DataError, match="http"):
        Endpoint("file:///etc/passwd")


# ------------------------------------------------------------------ MariaDB


@pytest.mark.mysql
def test_scores_rows_and_reuses_connections(db: pymysql.Connection, endpoint: ModeServer) -> None:
    query(db, "CREATE TABLE pairs (u BIGINT, p BIGINT)")
    pairs = [(u, 1000 + 3 * u) for u in range(60)]
    with db.cursor() as cur:
        cur.executemany("INSERT INTO pairs VALUES (%s, %s)", pairs)
    before_req, before_conn = endpoint.requests["ok"], endpoint.connections["ok"]
    rows = query(db, "SELECT u, p, score_ok(u, p), score_ok_strict(u, p) FROM pairs ORDER BY u")
    assert [(u, p, float(u + p), float(u + p)) for u, p in pairs] == rows
    assert endpoint.requests["ok"] - before_req == 120
    # Stored functions run the UDF's init/deinit per row: only the pool keeps connections.
    assert endpoint.connections["ok"] - before_conn <= 2
    assert query(db, "SELECT recsql_invoke('rtest-ok', 1, 2.5, '3')") == [(6.5,)]


@pytest.mark.mysql
def test_null_argument_gives_null_without_a_request(db, endpoint: ModeServer) -> None:
    before = endpoint.total()
    rows = query(
        db,
        "SELECT score_ok(NULL, 1), score_ok_strict(2, NULL), "
        "recsql_invoke('rtest-ok', 1, NULL), recsql_last_error()",
    )
    assert rows == [(None, None, None, None)]
    assert endpoint.total() == before


@pytest.mark.mysql
def test_unlisted_endpoint_is_never_requested(db, endpoint: ModeServer) -> None:
    before = endpoint.total()
    rows = query(db, "SELECT score_unlisted(1, 2), recsql_last_error()")
    assert rows == [(None, b"endpoint 'rtest-unlisted' is not in the allow-list")]
    assert query(db, "SELECT recsql_invoke('http://evil.example/', 1)")[0] == (None,)
    with pytest.raises(pymysql.err.OperationalError, match="not in the allow-list") as err:
        query(db, "SELECT score_unlisted_strict(1, 2)")
    assert err.value.args[0] == SIGNAL_ERRNO
    assert endpoint.total() == before
    assert_alive(db)


@pytest.mark.mysql
@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("down", "Couldn't connect|unavailable"),
        ("slow", "Timeout|unavailable"),
        ("500", "HTTP 500: model exploded"),
        ("garbage", "not a number: '\\?\\?not a number'"),
        ("empty", "empty reply"),
        ("big", "reply longer than 65536 bytes"),
    ],
)
def test_endpoint_failures_give_null_or_sql_error(db, mode: str, reason: str) -> None:
    start = time.monotonic()
    assert query(db, f"SELECT score_{mode}(1, 2)") == [(None,)]
    (error,) = query(db, f"SELECT score_{mode}(1, 2) IS NULL AND recsql_last_error() IS NOT NULL")
    assert error == (1,)
    with pytest.raises(pymysql.err.OperationalError, match=reason) as err:
        query(db, f"SELECT score_{mode}_strict(1, 2)")
    assert err.value.args[0] == SIGNAL_ERRNO and f"rtest-{mode}" in err.value.args[1]
    assert time.monotonic() - start < 3 * SLOW_S  # timeouts bound every call
    assert_alive(db)


@pytest.mark.mysql
def test_a_hanging_endpoint_is_tried_only_a_few_times(db, endpoint: ModeServer) -> None:
    query(db, "CREATE TABLE pairs (u BIGINT, p BIGINT)")
    with db.cursor() as cur:
        cur.executemany("INSERT INTO pairs VALUES (%s, %s)", [(i, i) for i in range(20)])
    time.sleep(2.5)  # let a breaker opened by an earlier test on this server close again
    before = endpoint.requests["slow"]
    rows = query(db, "SELECT recsql_invoke('rtest-hang', u, p) FROM pairs")
    assert rows == [(None,)] * 20
    # Three timeouts in a row open the circuit: the other rows fail without a request.
    assert 1 <= endpoint.requests["slow"] - before <= 3
    assert b"unavailable" in query(db, "SELECT recsql_last_error()")[0][0]


@pytest.mark.mysql
def test_oversized_arguments_are_refused_without_a_request(db, endpoint: ModeServer) -> None:
    before = endpoint.total()
    assert query(db, "SELECT recsql_invoke('rtest-ok', REPEAT('x', 70000))") == [(None,)]
    assert b"arguments longer than 65536" in query(db, "SELECT recsql_last_error()")[0][0]
    assert endpoint.total() == before
    big = "y" * 60_000  # under the cap: sent and echoed whole
    assert query(db, "SELECT recsql_invoke_str('rtest-echo', %s)", (big,)) == [(big.encode(),)]
    assert_alive(db)


@pytest.mark.mysql
def test_arguments_are_sent_as_one_rfc4180_csv_line(db) -> None:
    rows = query(
        db,
        "SELECT recsql_invoke_str('rtest-echo', 42, -1.5e0, 'a,b', 'say \"hi\"', "
        "'two\nlines', 'plain', CAST(1.25 AS DECIMAL(5,2)))",
    )
    assert rows == [(b'42,-1.5,"a,b","say ""hi""","two\nlines",plain,1.25',)]


@pytest.mark.mysql
def test_target_model_is_sent_as_a_header(db) -> None:
    assert query(db, "SELECT target_of(1, 2), target_of_strict(1, 2)") == [("m1.tar.gz",) * 2]


@pytest.mark.mysql
def test_bad_calls_are_refused_at_prepare_time(db) -> None:
    with pytest.raises(pymysql.err.OperationalError, match="needs 2 to 1024 arguments"):
        query(db, "SELECT recsql_invoke('rtest-ok')")
    assert_alive(db)


@pytest.mark.mysql
def test_allow_list_changes_apply_to_the_next_statement(db, udf: Path, endpoint) -> None:
    write_allow_list(udf, {"rtest-late": Endpoint(f"{endpoint.url}/ok")})
    try:
        assert query(db, "SELECT recsql_invoke('rtest-late', 1, 2)") == [(3.0,)]
    finally:
        write_allow_list(udf, {}, remove=["rtest-late"])
    assert query(db, "SELECT recsql_invoke('rtest-late', 1, 2)") == [(None,)]


@pytest.mark.mysql
def test_failures_are_logged_once_per_statement(db) -> None:
    (log_path,) = query(db, "SELECT @@log_error")[0]
    path = Path(log_path)
    if not path.is_absolute():
        path = Path(query(db, "SELECT @@datadir")[0][0]) / path
    if not os.access(path, os.R_OK):
        pytest.skip(f"the server's error log {path} is not readable here")
    before = path.read_bytes().count(b"'rtest-logged'")
    query(db, "CREATE TABLE t (u BIGINT)")
    query(db, "INSERT INTO t VALUES (1), (2), (3), (4), (5)")
    for _ in range(3):
        assert query(db, "SELECT recsql_invoke('rtest-logged', u) FROM t") == [(None,)] * 5
    assert path.read_bytes().count(b"'rtest-logged'") - before == 1


@pytest.mark.mysql
def test_concurrent_sessions_share_the_pool(udf: Path, mysql_url: str, endpoint) -> None:
    errors: list[BaseException] = []

    def session(seed: int) -> None:
        try:
            conn = mysql_connect(mysql_url)
            with conn.cursor() as cur:
                for i in range(40):
                    cur.execute("SELECT recsql_invoke('rtest-ok', %s, %s)", (seed, i))
                    assert cur.fetchone() == (float(seed + i),)
            conn.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


@pytest.mark.mysql
def test_install_again_is_safe(udf: Path, mysql_conn, fresh_database: str, endpoint) -> None:
    mysql_conn.select_db(fresh_database)
    install_udf(mysql_conn, {"rtest-ok": f"{endpoint.url}/ok"}, [FUNCTIONS[0]], allow_list=udf)
    first = create_functions(mysql_conn, [FUNCTIONS[0]])
    assert create_functions(mysql_conn, [FUNCTIONS[0]]) == first
    assert query(mysql_conn, "SELECT score_ok(2, 3)") == [(5.0,)]


@pytest.mark.mysql
@pytest.mark.slow
def test_against_the_real_recsql_server(db, udf: Path, tmp_path: Path) -> None:
    from model import load_model
    from tests.serve.conftest import PRODUCT_IDS, USER_IDS, make_artifact, running

    model_dir = make_artifact(tmp_path / "model")
    with running(["--model-dir", str(model_dir), "--workers", "1"], tmp_path) as server:
        write_allow_list(udf, {"rtest-recsql": Endpoint(server.url)})
        try:
            create_functions(db, [_fn("will_purchase", "rtest-recsql", "FLOAT")])
            users = [int(u) for u in USER_IDS[:20]] + [1]  # 1 is unknown: NULL
            products = [int(p) for p in PRODUCT_IDS[5:25]] + [int(PRODUCT_IDS[0])]
            query(db, "CREATE TABLE pairs (u BIGINT, p BIGINT)")
            with db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO pairs VALUES (%s, %s)", list(zip(users, products, strict=True))
                )
            got = [r[0] for r in query(db, "SELECT will_purchase_strict(u, p) FROM pairs")]
        finally:
            write_allow_list(udf, {}, remove=["rtest-recsql"])
    want = load_model(model_dir).score(np.array(users), np.array(products))
    assert got[-1] is None
    assert np.allclose(np.array(got[:-1], dtype=float), want[:-1], rtol=1e-5)
