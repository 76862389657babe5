"""Fresh events from SQL (db/events.py): DuckDB's record_event(), MariaDB's AFTER INSERT
trigger through recsql_event, `recsql events push`, and the Aurora trigger's payload, all
against a real `recsql serve` (gunicorn on loopback) with a history model, whose SQLite
event store the tests read back."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import numpy as np
import pymysql
import pytest

from db.aurora import aurora_events_script
from db.duckdb_udf import install_duckdb_functions
from db.events import send_events
from db.functions import EVENT_FUNCTIONS, RECORD_EVENT, WILL_PURCHASE
from db.http import EndpointError, EndpointPool
from db.load import mysql_connect
from db.mysql_udf import (
    Endpoint,
    Vectors,
    build_udf,
    create_functions,
    event_trigger_ddl,
    install_udf,
    write_allow_list,
)
from db.vectors import write_vectors
from model import load_model
from model.history import TYPE_CODES
from recsql_cli import main
from serve.events import FreshEvents
from tests.serve.conftest import PRODUCT_IDS, USER_IDS, make_history_artifact, running

LATER = 1_900_000_000  # after every event of the test artifact


@pytest.fixture(scope="module")
def history_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_history_artifact(tmp_path_factory.mktemp("history") / "model")


@pytest.fixture(scope="module")
def served(history_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A 1-worker server on the history model; its event store is a SQLite file we read."""
    tmp = tmp_path_factory.mktemp("events-server")
    url = f"sqlite://{tmp / 'events.sqlite'}"
    args = ["--model-dir", str(history_dir), "--workers", "1"]
    with running(args, tmp, {"RECSQL_EVENTS_URL": url}) as srv:
        srv.events_url = url
        yield srv


def stored(srv, user: int) -> list[tuple[int, str, int]]:
    """(product, type, time) of a user's events in the server's store, in time order."""
    events = FreshEvents(srv.events_url, 200, 86400, "").lookup(np.array([user]))
    names = {v: k for k, v in TYPE_CODES.items()}
    return [
        (int(e["product_id"]), names[int(e["event_type"])], int(e["event_time"]))
        for e in events.get(user, [])
    ]


def top_k(srv, user: int, k: int = 5) -> list[int]:
    r = srv.post("/invocations", json.dumps({"user_id": [user], "top_k": k}), "application/json")
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]["product_ids"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_user(n: int) -> int:
    """A visitor id no other test uses (the store is shared by the module)."""
    return -(10_000 + n * 1000 + uuid.uuid4().int % 1000)


# ------------------------------------------------------------------------ the client


def test_a_bad_row_costs_only_itself(served) -> None:
    """The server rejects a batch whole; send_events splits it so the good rows are taken,
    in order, and each bad row gets its own 0 and reason."""
    pool = EndpointPool(served.url)
    user = fresh_user(1)
    good = [
        {"user_id": user, "product_id": int(PRODUCT_IDS[p]), "event_time": LATER + p}
        for p in range(10)
    ]
    entries = [*good[:3], {"user_id": user, "product_id": 1, "event_type": "bogus"}, *good[3:]]
    entries.insert(8, {"user_id": user, "product_id": "x"})
    verdicts = send_events(pool, entries)
    assert verdicts.taken == [1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1]
    assert len(verdicts.reasons) == 2 and "bogus" in verdicts.reasons[0]
    assert [p for p, _, _ in stored(served, user)] == [int(p) for p in PRODUCT_IDS[:10]]
    all_bad = [{"user_id": user, "product_id": None}] * 50
    before = pool.requests
    assert send_events(pool, all_bad).taken == [0] * 50
    assert pool.requests - before == 1  # "50 of 50 entries rejected": no splitting
    pool.close()


def test_a_server_without_events_is_an_error_not_a_rejection(tmp_path, history_dir) -> None:
    args = ["--model-dir", str(history_dir), "--workers", "1"]
    with running(args, tmp_path, {"RECSQL_EVENTS_URL": "off"}) as srv:
        pool = EndpointPool(srv.url)
        with pytest.raises(EndpointError, match="HTTP 400.*fresh events are off"):
            send_events(pool, [{"user_id": 1, "product_id": 2}] * 20)
        assert pool.requests == 1
        pool.close()


# ------------------------------------------------------------------------ DuckDB


def test_duckdb_record_event_feeds_the_store(served) -> None:
    con = duckdb.connect()
    install_duckdb_functions(con, {"recsql": served.url}, EVENT_FUNCTIONS)
    user, visitor = int(USER_IDS[4]), fresh_user(2)
    before = top_k(served, user)
    assert top_k(served, visitor) == []
    con.execute(
        "CREATE TABLE events_new (user_id BIGINT, product_id BIGINT, event_type VARCHAR,"
        " event_time TIMESTAMP)"
    )
    rows = [
        (user, int(PRODUCT_IDS[440]), "cart", "2030-03-17 17:46:40"),
        (user, int(PRODUCT_IDS[441]), "purchase", "2030-03-17 17:47:40"),
        (user, int(PRODUCT_IDS[442]), "bogus", "2030-03-17 17:48:40"),  # rejected
        (None, int(PRODUCT_IDS[443]), "view", None),  # not sent
        (user, int(PRODUCT_IDS[444]), None, "2030-03-17 17:49:40"),  # NULL type: a view
    ]
    con.executemany("INSERT INTO events_new VALUES (?, ?, ?, ?)", rows)
    con.execute(
        "CREATE TABLE log AS SELECT product_id, record_event(user_id, product_id, event_type,"
        " event_time) AS taken FROM events_new"
    )
    got = dict(con.execute("SELECT product_id, taken FROM log").fetchall())
    assert [got[r[1]] for r in rows] == [1, 1, 0, None, 1]
    assert stored(served, user)[-3:] == [
        (int(PRODUCT_IDS[440]), "cart", LATER),  # 2030-03-17 17:46:40 UTC
        (int(PRODUCT_IDS[441]), "purchase", LATER + 60),
        (int(PRODUCT_IDS[444]), "view", LATER + 180),
    ]
    assert top_k(served, user) != before
    # a visitor: record_session_event, and the session id is then scored as a user id
    taken = con.execute(
        "SELECT record_session_event($s, $p, 'view', NULL)",
        {"s": visitor, "p": int(PRODUCT_IDS[7])},
    ).fetchall()
    assert taken == [(1,)] and stored(served, visitor)[0][:2] == (int(PRODUCT_IDS[7]), "view")
    assert top_k(served, visitor) != []
    con.close()


def test_duckdb_record_event_endpoint_down() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    for on_error in ("error", "null"):
        con = duckdb.connect()
        install_duckdb_functions(con, {"recsql": url}, [RECORD_EVENT], on_error=on_error)
        query = "SELECT record_event(1, 2, 'view', NULL) FROM range(3)"
        if on_error == "error":
            with pytest.raises(duckdb.Error, match="record_event: endpoint recsql"):
                con.execute(query).fetchall()
        else:
            assert con.execute(query).fetchall() == [(None,)] * 3
        con.close()


# ------------------------------------------------------------------------ MariaDB


@pytest.fixture(scope="module")
def udf(mysql_url: str, served) -> Iterator[dict[str, str]]:
    """The loadable functions installed; allow-list names: a live one and a dead one."""
    names = {"live": f"rev-{uuid.uuid4().hex[:8]}", "dead": f"rev-{uuid.uuid4().hex[:8]}"}
    endpoints = {
        names["live"]: Endpoint(served.url),
        names["dead"]: Endpoint(f"http://127.0.0.1:{closed_port()}"),
    }
    conn = mysql_connect(mysql_url)
    try:
        path = install_udf(conn, endpoints, _functions(names["live"]), so_path=build_udf())
        yield {**names, "allow_list": str(path)}
        write_allow_list(
            path, {}, remove=[*names.values(), *(n + ".events" for n in names.values())]
        )
    finally:
        conn.close()


def sql(conn: pymysql.Connection, statement: str, args: object = None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(statement, args)
        return list(cur.fetchall())


def last_error(conn: pymysql.Connection) -> str:
    (value,) = sql(conn, "SELECT recsql_last_error()")[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _functions(endpoint: str) -> list:
    return [dataclasses.replace(f, endpoint=endpoint) for f in (WILL_PURCHASE, *EVENT_FUNCTIONS)]


def test_mariadb_trigger_feeds_the_store(udf, mysql_conn, fresh_database, served) -> None:
    mysql_conn.select_db(fresh_database)
    from db.mysql_udf import allow_list_entries

    functions = _functions(udf["live"])
    write_allow_list(
        Path(udf["allow_list"]), allow_list_entries({udf["live"]: served.url}, functions)
    )
    created = create_functions(mysql_conn, functions)
    assert f"{fresh_database}.record_event" in created
    assert f"{fresh_database}.record_event_strict" not in created  # never raises: no twin
    sql(
        mysql_conn,
        "CREATE TABLE events (id INT AUTO_INCREMENT PRIMARY KEY, user_id BIGINT,"
        " product_id BIGINT, event_type VARCHAR(16), event_time DATETIME) ENGINE=InnoDB",
    )
    sql(mysql_conn, event_trigger_ddl("events", functions[1]))
    user, product = int(USER_IDS[9]), int(PRODUCT_IDS[445])
    score = "SELECT will_purchase(%s, %s)"
    before_score = sql(mysql_conn, score, (user, product))[0][0]
    before_top = top_k(served, user)
    mysql_conn.begin()
    sql(
        mysql_conn,
        "INSERT INTO events (user_id, product_id, event_type, event_time) VALUES"
        " (%s, %s, 'cart', '2030-03-17 17:46:40'), (%s, %s, 'purchase', '2030-03-17 17:47:40')",
        (user, product, user, product),
    )
    mysql_conn.commit()
    assert stored(served, user)[-2:] == [
        (product, "cart", LATER),
        (product, "purchase", LATER + 60),
    ]
    assert sql(mysql_conn, score, (user, product))[0][0] != pytest.approx(before_score, rel=1e-6)
    assert top_k(served, user) != before_top
    # a bad row: the insert stands, the event is rejected, the reason is there to read
    sql(
        mysql_conn,
        "INSERT INTO events (user_id, product_id, event_type) VALUES (%s, 1, 'x')",
        (user,),
    )
    assert "rejected the event" in last_error(mysql_conn)
    assert sql(mysql_conn, "SELECT count(*) FROM events")[0][0] == 3
    assert sql(mysql_conn, "SELECT record_event(NULL, 1, NULL, NULL)") == [(None,)]


def test_mariadb_insert_succeeds_with_the_server_down(udf, mysql_conn, fresh_database) -> None:
    mysql_conn.select_db(fresh_database)
    from db.mysql_udf import allow_list_entries

    functions = _functions(udf["dead"])
    dead = f"http://127.0.0.1:{closed_port()}"
    write_allow_list(Path(udf["allow_list"]), allow_list_entries({udf["dead"]: dead}, functions))
    create_functions(mysql_conn, functions)
    sql(
        mysql_conn,
        "CREATE TABLE events (user_id BIGINT, product_id BIGINT,"
        " event_type VARCHAR(16), event_time DATETIME) ENGINE=InnoDB",
    )
    sql(mysql_conn, event_trigger_ddl("events", functions[1]))
    mysql_conn.begin()
    sql(mysql_conn, "INSERT INTO events VALUES (1, 2, 'view', NULL), (3, 4, 'cart', NULL)")
    mysql_conn.commit()
    assert sql(mysql_conn, "SELECT count(*) FROM events")[0][0] == 2
    reason = last_error(mysql_conn)
    assert f"endpoint '{udf['dead']}.events'" in reason and "connect" in reason.lower()
    assert sql(mysql_conn, "SELECT record_event(1, 2, 'view', NULL)") == [(None,)]


def test_in_server_scoring_reads_the_artifact_not_the_store(
    udf, mysql_conn, served, history_dir
) -> None:
    """Documented: fresh events move the HTTP path's score, never the in-server one."""
    vec_dir = Path(tempfile.mkdtemp(prefix="recsql-vec-"))
    vec_dir.chmod(0o755)
    name = f"rvec-{uuid.uuid4().hex[:8]}"
    try:
        write_vectors(load_model(history_dir), vec_dir / "h.vectors")
        write_allow_list(Path(udf["allow_list"]), {name: Vectors(vec_dir / "h.vectors")})
        user, product = int(USER_IDS[20]), int(PRODUCT_IDS[446])
        in_server = "SELECT recsql_invoke(%s, %s, %s)"
        over_http = "SELECT recsql_invoke(%s, %s, %s)"
        local_before = sql(mysql_conn, in_server, (name, user, product))[0][0]
        http_before = sql(mysql_conn, over_http, (udf["live"], user, product))[0][0]
        assert local_before == pytest.approx(http_before, rel=1e-5)
        taken = sql(
            mysql_conn,
            "SELECT recsql_event(%s, %s, %s, 'purchase', %s)",
            (udf["live"] + ".events", user, product, LATER),
        )
        assert taken == [(1,)]
        assert sql(mysql_conn, over_http, (udf["live"], user, product))[0][0] != pytest.approx(
            http_before, rel=1e-5
        )
        assert sql(mysql_conn, in_server, (name, user, product))[0][0] == local_before
        # and an in-server name takes no events
        assert sql(mysql_conn, "SELECT recsql_event(%s, 1, 2, NULL, NULL)", (name,)) == [(None,)]
        assert "in-server model" in last_error(mysql_conn)
    finally:
        write_allow_list(Path(udf["allow_list"]), {}, remove=[name])
        shutil.rmtree(vec_dir, ignore_errors=True)


# ------------------------------------------------------------------------ events push


REES46_HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
)


def test_push_from_files_and_duckdb(served, tmp_path, capsys) -> None:
    user = fresh_user(3)
    lines = (
        [REES46_HEADER]
        + [f"2030-03-17 17:4{p}:40 UTC,view,{PRODUCT_IDS[p]},1,,,1.0,{user},s" for p in range(7)]
        + [f"2030-03-17 17:50:00 UTC,view,{PRODUCT_IDS[9]},1,,,1.0,,s"]
    )  # no user: skipped
    path = tmp_path / "2030-Mar.csv"
    path.write_text("\n".join(lines) + "\n")
    endpoint = ["--endpoint", f"recsql={served.url}", "--no-progress"]
    assert main(["events", "push", str(path), "--batch", "3", *endpoint]) == 0
    out = capsys.readouterr().out
    assert "pushed 7 events (8 rows read, 0 rejected, 1 skipped" in out and "3 requests" in out
    assert [p for p, _, _ in stored(served, user)] == [int(p) for p in PRODUCT_IDS[:7]]

    visitor = fresh_user(4)
    db = tmp_path / "e.duckdb"
    con = duckdb.connect(str(db))
    con.execute(
        "CREATE TABLE ev AS SELECT $v::BIGINT AS session_id, p::BIGINT AS product_id,"
        " CASE WHEN p = 2 THEN 'bogus' ELSE 'cart' END AS event_type,"
        " TIMESTAMP '2030-03-17 17:46:40' + INTERVAL (p) SECOND AS event_time"
        " FROM unnest($p) t(p)",
        {"v": visitor, "p": [int(p) for p in PRODUCT_IDS[:5]] + [2]},
    )
    con.close()
    query = "SELECT * FROM ev ORDER BY event_time"
    assert main(["events", "push", "--query", query, "--db", str(db), *endpoint]) == 0
    out = capsys.readouterr().out
    assert "pushed 5 events (6 rows read, 1 rejected" in out and "bogus" in out
    assert [t for _, t, _ in stored(served, visitor)] == ["cart"] * 5


class _FlakyEvents:
    """Takes `ok` requests of events, then answers 503 as a server whose store is down."""

    def __init__(self, ok: int) -> None:
        self.ok, self.seen = ok, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen += 1
                if outer.seen <= outer.ok:
                    status, body = 200, json.dumps({"taken": len(doc["events"]), "users": 1})
                else:
                    status, body = 503, "event store unavailable\n"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_push_stops_on_failure_saying_how_many_were_taken(tmp_path, capsys) -> None:
    db = tmp_path / "e.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE ev AS SELECT i AS user_id, i AS product_id FROM range(10) t(i)")
    con.close()
    flaky = _FlakyEvents(ok=2)
    try:
        args = [
            "events",
            "push",
            "--query",
            "SELECT * FROM ev",
            "--db",
            str(db),
            "--batch",
            "3",
            "--endpoint",
            f"recsql={flaky.url}",
            "--no-progress",
        ]
        assert main(args) == 1
    finally:
        flaky.close()
    err = capsys.readouterr().err
    assert "stopped after 6 events taken" in err and "HTTP 503" in err
    assert err.count("\n") == 1
    dead = ["--endpoint", f"recsql=http://127.0.0.1:{closed_port()}", "--no-progress"]
    assert main(["events", "push", "--query", "SELECT * FROM ev", "--db", str(db), *dead]) == 1
    assert "stopped after 0 events taken" in capsys.readouterr().err
    assert main(["events", "push", "--db", str(db), *dead]) == 1  # neither files nor query
    assert "give either event files or --query" in capsys.readouterr().err


# ------------------------------------------------------------------------ Aurora


def client_statements(script: str) -> list[str]:
    """The statements of a script for the mysql client, which understands DELIMITER."""
    statements, delimiter, current = [], ";", []
    for line in script.splitlines():
        if line.startswith("DELIMITER "):
            delimiter = line.split()[1]
        elif not line.startswith("--"):
            current.append(line)
            if line.rstrip().endswith(delimiter):
                statements.append("\n".join(current).rstrip()[: -len(delimiter)].strip())
                current = []
    return statements


def test_aurora_trigger_payload_is_what_the_lambda_takes(mysql_conn, fresh_database) -> None:
    """Aurora's trigger SQL on MariaDB, with a stand-in lambda_async that keeps its payload:
    each insert gives one {"events": [row]} the Lambda's parser accepts."""
    from deploy.events_lambda import clean_events

    arn = "arn:aws:lambda:eu-west-1:123456789012:function:recsql-events"
    mysql_conn.select_db(fresh_database)
    sql(mysql_conn, "CREATE TABLE calls (arn TEXT, payload LONGTEXT)")
    sql(
        mysql_conn,
        "CREATE FUNCTION lambda_async(arn TEXT, payload LONGTEXT) RETURNS INT"
        " MODIFIES SQL DATA BEGIN INSERT INTO calls VALUES (arn, payload); RETURN 0; END",
    )
    sql(
        mysql_conn,
        "CREATE TABLE events (user_id BIGINT, product_id BIGINT,"
        " event_type VARCHAR(16), event_time DATETIME)",
    )
    script = aurora_events_script("events", arn, user="app")
    for statement in client_statements(script):
        if not statement.startswith(("GRANT", "SET DEFAULT ROLE")):  # no such role on MariaDB
            sql(mysql_conn, statement)
    sql(
        mysql_conn,
        "INSERT INTO events VALUES (7, 8, 'cart', '2030-03-17 17:46:40'), (9, 10, NULL, NULL)",
    )
    calls = sql(mysql_conn, "SELECT arn, payload FROM calls")
    assert [c[0] for c in calls] == [arn, arn]
    assert clean_events(json.loads(calls[0][1])) == [
        {"user_id": 7, "product_id": 8, "event_type": "cart", "event_time": "2030-03-17 17:46:40"}
    ]
    assert clean_events(json.loads(calls[1][1])) == [{"user_id": 9, "product_id": 10}]
    assert "GRANT AWS_LAMBDA_ACCESS TO 'app'@'%';" in script


def test_cli_prints_the_aurora_events_trigger(capsys) -> None:
    arn = "arn:aws:lambda:eu-west-1:123456789012:function:recsql-events"
    assert (
        main(
            [
                "sql",
                "install",
                "--engine",
                "aurora",
                "--events-table",
                "events",
                "--events-lambda",
                arn,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "CREATE FUNCTION will_purchase" in out and "AFTER INSERT ON `events`" in out
    assert f"lambda_async('{arn}'" in out
    assert (
        main(
            [
                "sql",
                "install",
                "--engine",
                "aurora",
                "--events-table",
                "events",
                "--events-lambda",
                "http://evil",
            ]
        )
        == 1
    )
    assert "bad Lambda function ARN" in capsys.readouterr().err


def test_cli_installs_record_event_on_mysql(
    udf, mysql_url, fresh_database, served, tmp_path, capsys
) -> None:
    """`recsql sql install --engine mysql` creates the events wrapper from a --functions file
    (the default set adds record_event and record_session_event to will_purchase's)."""
    name = f"rev-cli-{uuid.uuid4().hex[:8]}"
    functions = tmp_path / "functions.json"
    args = [
        ["user_id", "BIGINT"],
        ["product_id", "BIGINT"],
        ["event_type", "VARCHAR(32)"],
        ["event_time", "VARCHAR(64)"],
    ]
    doc = [
        {
            "name": "record_event",
            "args": args,
            "returns": "INT",
            "endpoint": name,
            "score": "events",
        }
    ]
    functions.write_text(json.dumps(doc))
    url = mysql_url.rsplit("/", 1)[0] + "/" + fresh_database
    argv = [
        "sql",
        "install",
        "--engine",
        "mysql",
        "--db",
        url,
        "--functions",
        str(functions),
        "--endpoint",
        f"{name}={served.url}",
    ]
    try:
        assert main(argv) == 0
        assert f"created {fresh_database}.record_event;" in capsys.readouterr().out
        allow_list = Path(udf["allow_list"]).read_text()
        assert f"{name}.events {served.url} timeout_ms=1000 connect_timeout_ms=200" in allow_list
        user = fresh_user(5)
        conn = mysql_connect(url)
        try:
            got = sql(
                conn,
                "SELECT record_event(%s, %s, 'cart', '1572688800')",
                (user, int(PRODUCT_IDS[3])),
            )
        finally:
            conn.close()
        assert got == [(1,)]
        assert stored(served, user) == [(int(PRODUCT_IDS[3]), "cart", 1572688800)]
    finally:
        write_allow_list(Path(udf["allow_list"]), {}, remove=[name, f"{name}.events"])
