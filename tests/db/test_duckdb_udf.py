"""DuckDB functions: real DuckDB, a real HTTP server on loopback."""

from __future__ import annotations

import socket

import duckdb
import pytest

from db.duckdb_udf import install_duckdb_functions
from db.functions import Argument, SqlFunction
from tests.db.scoring_server import ScoringServer, expected_score


@pytest.fixture
def server() -> ScoringServer:
    with ScoringServer() as srv:
        yield srv


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    yield c
    c.close()


def test_each_chunk_is_one_request(server: ScoringServer, con: duckdb.DuckDBPyConnection) -> None:
    install_duckdb_functions(con, {"recsql": server.url})
    con.execute("SET threads = 2")
    con.execute("CREATE TABLE pairs AS SELECT i AS u, (i * 7) % 1000 AS p FROM range(10000) t(i)")
    rows = con.execute("SELECT u, p, will_purchase(u, p) FROM pairs ORDER BY u").fetchall()
    assert len(rows) == 10000
    for u, p, score in rows:
        assert score == pytest.approx(expected_score(u, p), abs=1e-6)
    assert server.rows == 10000
    # 10,000 rows in one row group: DuckDB's 2,048-row vectors, one request each.
    assert sorted(server.batch_sizes) == [1808] + [2048] * 4


def test_nulls_are_not_sent_and_rows_stay_aligned(
    server: ScoringServer, con: duckdb.DuckDBPyConnection
) -> None:
    install_duckdb_functions(con, {"recsql": server.url})
    con.execute(
        "CREATE TABLE pairs AS SELECT i AS k, CASE WHEN i % 3 = 0 THEN NULL ELSE i END AS u, "
        "CASE WHEN i % 5 = 0 THEN NULL WHEN i % 7 = 0 THEN -1 ELSE i % 50 END AS p "
        "FROM range(3000) t(i)"
    )
    rows = con.execute("SELECT u, p, will_purchase(u, p) FROM pairs ORDER BY k").fetchall()
    sent = sum(1 for u, p, _ in rows if u is not None and p is not None)
    assert server.rows == sent < 3000
    for u, p, score in rows:
        if u is None or p is None or p < 0:
            assert score is None
        else:
            assert score == pytest.approx(expected_score(u, p), abs=1e-6)


def test_not_constant_folded(server: ScoringServer, con: duckdb.DuckDBPyConnection) -> None:
    install_duckdb_functions(con, {"recsql": server.url})
    con.execute("SELECT will_purchase(1, 2) FROM range(3)").fetchall()
    con.execute("SELECT will_purchase(1, 2)").fetchall()
    assert server.requests >= 2  # evaluated at run time for every query


def test_endpoint_down_fails_the_query_or_gives_null(con: duckdb.DuckDBPyConnection) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    install_duckdb_functions(con, {"recsql": url})
    with pytest.raises(duckdb.Error, match="will_purchase: endpoint recsql"):
        con.execute("SELECT will_purchase(1, 2)").fetchall()
    install_duckdb_functions(con, {"recsql": url}, on_error="null")
    assert con.execute("SELECT will_purchase(i, 2) FROM range(3) t(i)").fetchall() == [(None,)] * 3


def test_http_error_message_reaches_sql(con: duckdb.DuckDBPyConnection) -> None:
    with ScoringServer(status=503) as srv:
        install_duckdb_functions(con, {"recsql": srv.url})
        with pytest.raises(duckdb.Error, match="HTTP 503: model exploded"):
            con.execute("SELECT will_purchase(1, 2)").fetchall()


def test_target_model_small_batches_and_text_results(
    server: ScoringServer, con: duckdb.DuckDBPyConnection
) -> None:
    fn = SqlFunction(
        "purchase_label",
        (Argument("user_id", "BIGINT"), Argument("product_id", "BIGINT")),
        returns="VARCHAR(32)",
        endpoint="shop",
        target_model="model-b.tar.gz",
        max_batch_size=100,
    )
    install_duckdb_functions(con, {"shop": server.url}, [fn])
    rows = con.execute("SELECT purchase_label(i, 1), i FROM range(250) t(i) ORDER BY i").fetchall()
    assert [float(v) for v, _ in rows] == pytest.approx([expected_score(i, 1) for i in range(250)])
    assert server.batch_sizes == [100, 100, 50]
    assert set(server.target_models) == {"model-b.tar.gz"}
    assert con.execute("SELECT purchase_label(-5, 1)").fetchall() == [(None,)]


def test_missing_endpoint_url_is_a_clear_error(con: duckdb.DuckDBPyConnection) -> None:
    from model.errors import BadRequest

    with pytest.raises(BadRequest, match="no URL for endpoint 'recsql'"):
        install_duckdb_functions(con, {"other": "http://127.0.0.1:1"})
