"""MariaDB + the recsql loadable function when things go wrong, and what a SQL user may do.

- The scoring server dies in the middle of a query that calls will_purchase /
  will_purchase_strict: MariaDB keeps running, the lenient query returns the
  scores it got and NULL after the stop, the strict one raises.
- A SQL user with only SELECT/EXECUTE cannot make the database call an
  endpoint that is not in the allow-list (nor a URL), nor register a function.

Needs MariaDB (tests/db/conftest.py's policy: skipped with a hint outside CI,
failed under CI) and gcc + libcurl to build db/udf.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pymysql
import pytest

from db.functions import Argument, SqlFunction
from db.load import mysql_connect
from db.mysql_udf import Endpoint, build_udf, create_functions, install_udf, write_allow_list
from model import load_model
from tests.db.scoring_server import ScoringServer, expected_score
from tests.fault.loadgen import children
from tests.serve.conftest import PRODUCT_IDS, USER_IDS, Server, running

pytestmark = pytest.mark.mysql
SIGNAL_ERRNO = 1644  # SIGNAL SQLSTATE '45000'
ROWS = 40_000  # far more than the server scores before it is stopped


@pytest.fixture(scope="module")
def endpoint_names() -> Iterator[dict[str, str]]:
    """Allow-list names unique to this run (the UDF's circuit breaker is per name)."""
    tag = uuid.uuid4().hex[:8]
    yield {key: f"fault-{key}-{tag}" for key in ("stop", "listed", "unlisted")}


@pytest.fixture(scope="module")
def allow_list(mysql_url: str, endpoint_names: dict[str, str]) -> Iterator[Path]:
    """The UDF built and registered; yields the allow-list path, cleaned after."""
    conn = mysql_connect(mysql_url)
    try:
        path = install_udf(conn, {}, [], so_path=build_udf())
        yield path
        write_allow_list(path, {}, remove=list(endpoint_names.values()))
    finally:
        conn.close()


def query(conn: pymysql.Connection, sql: str, args: object = None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def pairs_table(conn: pymysql.Connection, rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    users = rng.choice(USER_IDS, rows)
    products = rng.choice(PRODUCT_IDS, rows)
    query(conn, "CREATE TABLE pairs (k INT PRIMARY KEY, u BIGINT, p BIGINT)")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO pairs VALUES (%s, %s, %s)",
            list(zip(range(rows), users.tolist(), products.tolist(), strict=True)),
        )
    return users, products


def stop_mid_query(conn: pymysql.Connection, srv: Server, sql: str) -> list[tuple] | Exception:
    """Run `sql` in a thread; SIGKILL the server's workers and master once it is scoring."""
    outcome: list[list[tuple] | Exception] = []

    def run() -> None:
        try:
            outcome.append(query(conn, sql))
        except pymysql.MySQLError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)  # the query is now sending rows to the server
    assert thread.is_alive(), "the query finished before the server was stopped"
    for pid in [*children(srv.proc.pid), srv.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    srv.proc.wait(10)
    thread.join(60)
    assert not thread.is_alive(), "the query did not finish after the server died"
    return outcome[0]


def test_server_killed_mid_query(
    mysql_url, mysql_conn, fresh_database, allow_list, endpoint_names, model_dir, tmp_path
) -> None:
    name = endpoint_names["stop"]
    fn = SqlFunction(
        "will_purchase", (Argument("u", "BIGINT"), Argument("p", "BIGINT")), "DOUBLE", endpoint=name
    )
    mysql_conn.select_db(fresh_database)
    users, products = pairs_table(mysql_conn, ROWS)
    want = load_model(model_dir).score(users, products)

    with running(["--model-dir", str(model_dir), "--workers", "1"], tmp_path) as srv:
        write_allow_list(allow_list, {name: Endpoint(srv.url, connect_timeout_ms=300)})
        create_functions(mysql_conn, [fn])
        lenient = stop_mid_query(
            mysql_conn, srv, "SELECT k, will_purchase(u, p) FROM pairs ORDER BY k"
        )
    assert isinstance(lenient, list) and len(lenient) == ROWS
    got = np.array([np.nan if s is None else s for _, s in lenient], dtype=float)
    scored = int(np.argmax(np.isnan(got)))  # rows before the stop
    print(f"\nlenient: {scored} of {ROWS} rows scored before the stop, then NULL")
    assert 0 < scored < ROWS
    np.testing.assert_allclose(got[:scored], want[:scored], rtol=1e-5, atol=1e-6)
    assert np.isnan(got[scored:]).all()  # the server stays down: NULL from there on
    assert query(mysql_conn, "SELECT 1") == [(1,)]  # same session still works

    with running(["--model-dir", str(model_dir), "--workers", "1"], tmp_path) as srv:
        write_allow_list(allow_list, {name: Endpoint(srv.url, connect_timeout_ms=300)})
        strict = stop_mid_query(mysql_conn, srv, "SELECT k, will_purchase_strict(u, p) FROM pairs")
    assert isinstance(strict, pymysql.err.OperationalError), strict
    assert strict.args[0] == SIGNAL_ERRNO and name in strict.args[1]
    print(f"strict: {strict.args[1]}")
    fresh = mysql_connect(mysql_url)
    try:  # the database server itself never noticed
        assert query(fresh, "SELECT 1") == [(1,)]
        assert query(mysql_conn, "SELECT COUNT(*) FROM pairs") == [(ROWS,)]
    finally:
        fresh.close()


@pytest.fixture
def limited_user(mysql_url: str, fresh_database: str) -> Iterator[pymysql.Connection]:
    """A connection as a new user holding only SELECT and EXECUTE on a fresh database."""
    user, password = f"rq_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = mysql_connect(mysql_url)
    try:
        query(admin, "CREATE USER %s@'%%' IDENTIFIED BY %s", (user, password))
        query(admin, f"GRANT SELECT, EXECUTE ON `{fresh_database}`.* TO %s@'%%'", (user,))
        host, port = admin.host, admin.port
        conn = pymysql.connect(
            host=host,
            port=port,
            user=user,
            password=password,
            database=fresh_database,
            autocommit=True,
        )
        try:
            yield conn
        finally:
            conn.close()
    finally:
        query(admin, "DROP USER IF EXISTS %s@'%%'", (user,))
        admin.close()


def test_sql_user_cannot_reach_unlisted_endpoints(
    limited_user, allow_list, endpoint_names, mysql_conn, fresh_database
) -> None:
    with ScoringServer() as listening:
        write_allow_list(allow_list, {endpoint_names["listed"]: Endpoint(listening.url)})
        mysql_conn.select_db(fresh_database)
        create_functions(
            mysql_conn,
            [
                SqlFunction(
                    "score",
                    (Argument("u", "BIGINT"), Argument("p", "BIGINT")),
                    "DOUBLE",
                    endpoint=endpoint_names["listed"],
                )
            ],
        )
        # The listed endpoint works for this user: the counting server sees the request.
        assert query(limited_user, "SELECT score(3, 4)") == [(expected_score(3, 4),)]
        assert listening.requests == 1
        for name in (
            endpoint_names["unlisted"],
            listening.url,
            listening.url + "/invocations",
            f"{endpoint_names['listed']} {listening.url}",
            "../" + endpoint_names["listed"],
        ):
            assert query(limited_user, "SELECT recsql_invoke(%s, 3, 4)", (name,)) == [(None,)]
            (reason,) = query(limited_user, "SELECT recsql_last_error()")[0]
            assert b"not in the allow-list" in reason or b"endpoint name" in reason, reason
        assert listening.requests == 1  # nothing else reached the server

    refused = [
        "CREATE FUNCTION rq_f RETURNS REAL SONAME 'recsql_udf.so'",
        "CREATE FUNCTION rq_g RETURNS STRING SONAME 'libc.so.6'",
        "DROP FUNCTION recsql_invoke",
        "INSERT INTO mysql.func VALUES ('rq_h', 1, 'recsql_udf.so', 'function')",
        "CREATE FUNCTION rq_s() RETURNS DOUBLE RETURN recsql_invoke('http://127.0.0.1:1', 1)",
        "SELECT LOAD_FILE(recsql_endpoints_path())",
    ]
    for sql in refused[:-1]:
        with pytest.raises(pymysql.err.OperationalError) as err:
            query(limited_user, sql)
        assert err.value.args[0] in (1044, 1045, 1142, 1227, 1370), err.value.args
    # Without the FILE privilege the allow-list cannot even be read back.
    assert query(limited_user, refused[-1]) == [(None,)]
    functions = query(mysql_conn, "SELECT name FROM mysql.func WHERE name LIKE 'rq\\_%%'")
    assert functions == []
