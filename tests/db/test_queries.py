"""The example queries run on DuckDB and on MariaDB/MySQL and return sensible rows."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from db.duckdb_udf import install_duckdb_functions
from db.http import Endpoints
from db.load import load_events_duckdb, load_events_mysql, mysql_connect
from db.queries import EXAMPLES, run_example_queries
from db.score import ScoreOptions, score_duckdb
from tests.db import mysql_support
from tests.db.rees46_files import event_lines, write_events
from tests.db.scoring_server import ScoringServer, expected_score

mysql_db = mysql_support.mysql_db  # fixture: a fresh database per test

USER = 500_000_003


@pytest.fixture
def events(tmp_path: Path) -> Path:
    return write_events(tmp_path / "events.csv", event_lines(3000))


def _check(results: dict, with_scores: bool) -> None:
    columns, rows = results["user_candidates"]
    assert columns[0] == "product_id" and columns[-1] == "score" and 0 < len(rows) <= 10
    scores = [r[-1] for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        assert r[-1] == pytest.approx(expected_score(USER, r[0]), abs=1e-6)

    columns, rows = results["segment_top_products"]
    assert columns == ["user_id", "product_id", "score", "rnk"] and rows
    for user in {r[0] for r in rows}:
        ranked = [r for r in rows if r[0] == user]
        assert [r[3] for r in ranked] == list(range(1, len(ranked) + 1)) and len(ranked) <= 3
        assert [r[2] for r in ranked] == sorted((r[2] for r in ranked), reverse=True)

    columns, rows = results["user_brand_affinity"]
    assert columns[:2] == ["category_code", "brand"] and rows
    assert all(r[1] is not None for r in rows)
    assert ("scores_by_brand" in results) == with_scores


def test_examples_on_duckdb(events: Path) -> None:
    con = duckdb.connect()
    load_events_duckdb(con, [events])
    with ScoringServer() as srv:
        endpoints = Endpoints({"recsql": srv.url})
        install_duckdb_functions(con, endpoints)
        _check(run_example_queries("duckdb", con, {"user_id": USER}), with_scores=False)
        score_duckdb(
            con,
            "SELECT DISTINCT user_id, product_id FROM events",
            endpoints,
            ScoreOptions(progress=False),
        )
        results = run_example_queries("duckdb", con, {"user_id": USER})
    _check(results, with_scores=True)
    columns, rows = results["scores_by_brand"]
    assert columns[:3] == ["category_code", "brand", "pairs"] and rows
    con.close()


# A stored function with the test server's formula stands in for the loadable C function
# (tested in tests/db/test_udf.py), so these tests check the example SQL on MariaDB itself.
_STAND_IN = """
CREATE FUNCTION will_purchase(user_id BIGINT, product_id BIGINT) RETURNS FLOAT
NOT DETERMINISTIC
RETURN IF(user_id < 0 OR product_id < 0, NULL, MOD(user_id * 31 + product_id, 97) / 97)
"""


@pytest.mark.mysql
def test_examples_on_mysql(events: Path, mysql_db: str) -> None:
    load_events_mysql(mysql_db, [events])
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute(_STAND_IN)
    _check(run_example_queries("mysql", conn, {"user_id": USER}), with_scores=False)
    conn.close()


def test_literal_sql_is_the_same_on_both_engines(events: Path) -> None:
    con = duckdb.connect()
    load_events_duckdb(con, [events])
    with ScoringServer() as srv:
        install_duckdb_functions(con, {"recsql": srv.url})
        for query in EXAMPLES.values():
            if query.name != "scores_by_brand":
                con.execute(query.literal({"user_id": USER})).fetchall()
    assert "$user_id" in EXAMPLES["user_candidates"].render("duckdb")
    assert "%(user_id)s" in EXAMPLES["user_candidates"].render("mysql")
    con.close()
