"""db/ against the real recsql server (gunicorn on loopback) and a random-weight MFBlock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pytest

from db.duckdb_udf import install_duckdb_functions
from db.http import Endpoints
from db.score import ScoreOptions, score_duckdb
from model.artifact import load_model, save_mfblock
from tests.serve.conftest import random_weights, running

USERS = np.arange(60, dtype=np.int64) * 11 + 500
PRODUCTS = np.arange(45, dtype=np.int64) * 3 + 9000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    model_dir = tmp_path_factory.mktemp("model")
    save_mfblock(model_dir, random_weights(7, len(USERS), len(PRODUCTS)), USERS, PRODUCTS)
    with running(["--model-dir", str(model_dir), "--workers", "1"], model_dir.parent) as srv:
        yield srv.url, model_dir


def test_duckdb_function_matches_the_model(served: tuple[str, Path]) -> None:
    url, model_dir = served
    model = load_model(model_dir)
    con = duckdb.connect()
    install_duckdb_functions(con, {"recsql": url})
    con.execute(
        "CREATE TABLE pairs AS SELECT i AS k, u.user_id, p.product_id "
        "FROM (SELECT unnest($u) AS user_id) u, (SELECT unnest($p) AS product_id) p, "
        "(SELECT 0) t(i) ORDER BY user_id, product_id",
        {"u": USERS.tolist() + [1], "p": PRODUCTS.tolist() + [2]},
    )
    rows = con.execute(
        "SELECT user_id, product_id, will_purchase(user_id, product_id) FROM pairs "
        "ORDER BY user_id, product_id"
    ).fetchall()
    u = np.array([r[0] for r in rows])
    p = np.array([r[1] for r in rows])
    got = np.array([np.nan if r[2] is None else r[2] for r in rows])
    want = model.score(u, p)
    assert len(rows) == (len(USERS) + 1) * (len(PRODUCTS) + 1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # unknown ids -> NULL
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-6)
    con.close()


def test_recsql_score_with_the_real_server(served: tuple[str, Path]) -> None:
    url, model_dir = served
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE pairs AS SELECT 500 + (i % 70) * 11 AS u, 9000 + (i % 50) * 3 AS p "
        "FROM range(30000) t(i)"
    )
    stats = score_duckdb(
        con,
        "SELECT u, p FROM pairs",
        Endpoints({"recsql": url}),
        ScoreOptions(batch=7000, progress=False),
    )
    assert stats.rows == 30000 and stats.requests == 5
    u, p, s = (
        np.array(c) for c in zip(*con.execute("SELECT * FROM scores").fetchall(), strict=True)
    )
    want = load_model(model_dir).score(u.astype(np.int64), p.astype(np.int64))
    s = np.array([np.nan if v is None else v for v in s], dtype=float)
    np.testing.assert_array_equal(np.isnan(s), np.isnan(want))
    np.testing.assert_allclose(s[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-5, atol=1e-6)
    con.close()
