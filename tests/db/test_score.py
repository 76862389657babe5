"""`recsql score` on real DuckDB and a real MariaDB/MySQL database, against a real HTTP server."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from db.http import EndpointError, Endpoints
from db.load import mysql_connect
from db.score import ScoreOptions, score_duckdb, score_mysql
from model.errors import BadRequest
from tests.db import mysql_support
from tests.db.scoring_server import ScoringServer, expected_score

mysql_db = mysql_support.mysql_db  # fixture: a fresh database per test

PAIRS = [((i * 17) % 900 - 3, (i * 5) % 400) for i in range(12_000)] + [(None, 4), (5, None)]


def _check(rows: list[tuple]) -> None:
    assert len(rows) == len(PAIRS)
    for (u, p), (ru, rp, score) in zip(PAIRS, rows, strict=True):
        assert (ru, rp) == (u, p)  # query order kept
        exp = None if u is None or p is None else expected_score(u, p)
        assert score == pytest.approx(exp, abs=1e-6) if exp is not None else score is None


def test_score_duckdb_writes_table_in_order() -> None:
    con = duckdb.connect()
    source = pa.table(
        {
            "k": range(len(PAIRS)),
            "user_id": [u for u, _ in PAIRS],
            "product_id": [p for _, p in PAIRS],
        }
    )
    con.register("source", source)
    con.execute("CREATE TABLE pairs AS SELECT * FROM source")
    con.execute("CREATE TABLE scores AS SELECT 1 AS stale")
    with ScoringServer() as srv:
        stats = score_duckdb(
            con,
            "SELECT user_id, product_id FROM pairs ORDER BY k",
            Endpoints({"recsql": srv.url}),
            ScoreOptions(batch=4000, progress=False),
        )
        sent = srv.rows
    # 4 batches; the last holds only the two NULL-argument rows, so it sends nothing
    assert stats.rows == len(PAIRS) and stats.requests == 3
    assert sent == len(PAIRS) - 2
    assert stats.nulls == 2 + sum(1 for u, p in PAIRS if u is not None and p is not None and u < 0)
    _check(con.execute("SELECT user_id, product_id, score FROM scores").fetchall())
    assert [c[0] for c in con.execute("DESCRIBE scores").fetchall()] == [
        "user_id",
        "product_id",
        "score",
    ]
    con.close()


def test_score_duckdb_failure_keeps_old_table() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE scores AS SELECT 42 AS old")
    with ScoringServer(status=500) as srv:
        with pytest.raises(EndpointError, match="HTTP 500"):
            score_duckdb(
                con,
                "SELECT i, i FROM range(100) t(i)",
                Endpoints({"recsql": srv.url}),
                ScoreOptions(progress=False),
            )
    assert con.execute("SELECT * FROM scores").fetchall() == [(42,)]
    assert con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'scores__new'"
    ).fetchall() == [(0,)]
    with pytest.raises(BadRequest, match="returns 1 columns"):
        score_duckdb(
            con,
            "SELECT 1",
            Endpoints({"recsql": "http://127.0.0.1:9"}),
            ScoreOptions(progress=False),
        )
    with pytest.raises(BadRequest, match="bad table name"):
        ScoreOptions(table="x; drop")
    con.close()


@pytest.mark.mysql
def test_score_mysql_streams_and_replaces(mysql_db: str) -> None:
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE pairs (k INT PRIMARY KEY, u BIGINT NULL, p BIGINT NULL)")
        cur.executemany(
            "INSERT INTO pairs VALUES (%s, %s, %s)", [(k, u, p) for k, (u, p) in enumerate(PAIRS)]
        )
        cur.execute("CREATE TABLE preds (old INT)")
    with ScoringServer() as srv:
        stats = score_mysql(
            mysql_db,
            "SELECT u, p FROM pairs ORDER BY k",
            Endpoints({"recsql": srv.url}),
            ScoreOptions(table="preds", batch=3000, workers=3, progress=False),
        )
    # 5 batches; the last holds only the two NULL-argument rows, so it sends nothing
    assert stats.rows == len(PAIRS) and stats.requests == 4
    with conn.cursor() as cur:
        cur.execute("SELECT user_id, product_id, score FROM preds")
        _check(list(cur.fetchall()))
        with ScoringServer(status=500) as srv:
            with pytest.raises(EndpointError):
                score_mysql(
                    mysql_db,
                    "SELECT u, p FROM pairs",
                    Endpoints({"recsql": srv.url}),
                    ScoreOptions(table="preds", progress=False),
                )
        cur.execute("SELECT count(*) FROM preds")
        assert cur.fetchall()[0][0] == len(PAIRS)  # the failed run changed nothing
        cur.execute("SHOW TABLES")
        assert sorted(r[0] for r in cur.fetchall()) == ["pairs", "preds"]
    conn.close()
