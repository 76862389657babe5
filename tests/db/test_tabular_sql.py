"""SQL functions on a multi-model endpoint: will_purchase (MFBlock) beside will_subscribe (bank).

One real recsql server (gunicorn, --multi-model) holds both models; each SQL
function reaches its own through X-Amzn-SageMaker-Target-Model. DuckDB (Arrow
UDFs) and MariaDB (the loadable function) must both return what the models
give in-process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pymysql
import pytest

from db.duckdb_udf import install_duckdb_functions
from db.functions import WILL_PURCHASE, WILL_SUBSCRIBE
from model import load_model
from tests.serve.conftest import PRODUCT_IDS, USER_IDS, Server, make_artifact, running
from training.tabular import TabularConfig, read_table, train_tabular

BANK = Path(__file__).resolve().parents[1] / "data" / "bank-full.csv.gz"
ENDPOINT = "rtest-tabular"  # an allow-list name of this test's own
PURCHASE = dataclasses.replace(WILL_PURCHASE, endpoint=ENDPOINT, target_model="rec")
SUBSCRIBE = dataclasses.replace(WILL_SUBSCRIBE, endpoint=ENDPOINT)
COLUMNS = ", ".join(a.name for a in WILL_SUBSCRIBE.args)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root with rec/model (random MFBlock) and bank/model (small XGBoost)."""
    root = tmp_path_factory.mktemp("models")
    make_artifact(root / "rec" / "model")
    config = TabularConfig(
        target="y", max_rows=1500, hyperparameters={"num_round": 30}, threads=1, progress=False
    )
    train_tabular(BANK, root / "bank" / "model", config)
    return root


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--multi-model", "--model-root", str(models), "--workers", "1"]
    with running(args, tmp_path_factory.mktemp("server")) as srv:
        for name in ("rec", "bank"):
            doc = json.dumps({"model_name": name, "url": str(models / name / "model")})
            assert srv.post("/models", doc, "application/json").status_code == 200
        yield srv


@pytest.fixture(scope="module")
def clients() -> list[list[object]]:
    """60 bank rows typed as the SQL arguments, one with an unseen job, one with a NULL."""
    table = read_table(BANK, "y")
    types = [a.sql_type for a in WILL_SUBSCRIBE.args]
    rows = []
    for i in range(80, 140):
        raw = [str(c[i]) for c in table.columns]
        rows.append([int(v) if t == "BIGINT" else v for v, t in zip(raw, types, strict=True)])
    rows[3][1] = "astronaut"  # not in the training vocabulary: all-zero one-hot, still scored
    rows[5][4] = None  # NULL argument: NULL result, the row is not sent
    return rows


def expected_subscribe(models: Path, rows: list[list[object]]) -> list[float | None]:
    model = load_model(models / "bank" / "model")
    complete = [r for r in rows if None not in r]
    probs = iter(model.predict_rows([[str(v) for v in r] for r in complete]).tolist())
    out = [None if None in r else next(probs) for r in rows]
    assert len({p >= 0.5 for p in out if p is not None}) == 2  # both sides of 0.5
    return out


def pairs() -> tuple[np.ndarray, np.ndarray]:
    users = np.concatenate([USER_IDS[:20], [1]])  # 1 is unknown: NULL
    products = np.concatenate([PRODUCT_IDS[5:25], [PRODUCT_IDS[0]]])
    return users, products


def assert_matches(got: list[float | None], want: list[float | None]) -> None:
    assert [g is None for g in got] == [w is None for w in want]
    g = np.array([x for x in got if x is not None], dtype=float)
    w = np.array([x for x in want if x is not None], dtype=float)
    np.testing.assert_allclose(g, w, rtol=1e-5)  # FLOAT results, 7 digits on the wire


@pytest.mark.slow
def test_duckdb_will_purchase_and_will_subscribe(server, models, clients) -> None:
    con = duckdb.connect()
    try:
        install_duckdb_functions(con, {ENDPOINT: server.url}, [PURCHASE, SUBSCRIBE])
        con.execute(f"CREATE TABLE clients ({_columns_ddl()})")
        con.executemany(f"INSERT INTO clients VALUES ({', '.join('?' * 16)})", clients)
        got = [
            r[0]
            for r in con.execute(
                f"SELECT will_subscribe({COLUMNS}) FROM clients ORDER BY rowid"
            ).fetchall()
        ]
        users, products = pairs()
        con.execute("CREATE TABLE pairs (u BIGINT, p BIGINT)")
        con.executemany(
            "INSERT INTO pairs VALUES (?, ?)",
            list(zip(users.tolist(), products.tolist(), strict=True)),
        )
        scores = [
            r[0]
            for r in con.execute("SELECT will_purchase(u, p) FROM pairs ORDER BY rowid").fetchall()
        ]
    finally:
        con.close()
    assert_matches(got, expected_subscribe(models, clients))
    want = load_model(models / "rec" / "model").score(users, products)
    assert_matches(scores, [None if np.isnan(x) else float(x) for x in want])


@pytest.mark.mysql
@pytest.mark.slow
def test_mariadb_will_subscribe(server, models, clients, mysql_url, fresh_database) -> None:
    from db.load import mysql_connect
    from db.mysql_udf import (
        allow_list_entries,
        build_udf,
        create_functions,
        install_udf,
        write_allow_list,
    )

    functions = [PURCHASE, SUBSCRIBE]
    endpoints = {ENDPOINT: server.url}
    conn = mysql_connect(mysql_url)
    try:
        allow_list = install_udf(conn, endpoints, functions, so_path=build_udf())
        try:
            conn.select_db(fresh_database)
            create_functions(conn, functions)
            got = _mariadb_scores(conn, clients)
        finally:
            write_allow_list(allow_list, {}, remove=allow_list_entries(endpoints, functions))
    finally:
        conn.close()
    assert_matches(got[0], expected_subscribe(models, clients))
    users, products = pairs()
    want = load_model(models / "rec" / "model").score(users, products)
    assert_matches(got[1], [None if np.isnan(x) else float(x) for x in want])


def _mariadb_scores(conn: pymysql.Connection, clients: list[list[object]]) -> tuple[list, list]:
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE clients (id INT PRIMARY KEY, {_columns_ddl()})")
        cur.executemany(
            f"INSERT INTO clients VALUES (%s, {', '.join(['%s'] * 16)})",
            [[i, *row] for i, row in enumerate(clients)],
        )
        cur.execute(f"SELECT will_subscribe_strict({COLUMNS}) FROM clients ORDER BY id")
        subscribe = [r[0] for r in cur.fetchall()]
        users, products = pairs()
        cur.execute("CREATE TABLE pairs (id INT PRIMARY KEY, u BIGINT, p BIGINT)")
        cur.executemany(
            "INSERT INTO pairs VALUES (%s, %s, %s)",
            [(i, int(u), int(p)) for i, (u, p) in enumerate(zip(users, products, strict=True))],
        )
        cur.execute("SELECT will_purchase_strict(u, p) FROM pairs ORDER BY id")
        purchase = [r[0] for r in cur.fetchall()]
    return subscribe, purchase


def _columns_ddl() -> str:
    return ", ".join(f"{a.name} {a.sql_type}" for a in WILL_SUBSCRIBE.args)
