"""One score, every path: a trained history model gives a (user, product) the same number
from `/invocations` pairs (CSV and JSON), top-K, batch transform, DuckDB, MariaDB over HTTP
and MariaDB in-server, repeat term included (relative error <= 1e-5; replies carry 7
significant digits). The same holds for two products' similarity (`similar_score`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pytest

from db.duckdb_udf import install_duckdb_functions
from db.functions import SIMILAR_SCORE
from db.load import mysql_connect
from db.mysql_udf import (
    Endpoint,
    Vectors,
    build_udf,
    create_functions,
    drop_functions,
    install_udf,
    write_allow_list,
)
from db.vectors import write_vectors
from model import load_model
from tests.serve.conftest import running
from training.config import TrainConfig
from training.events import PreparedEvents
from training.train import train

pytestmark = pytest.mark.mysql
RTOL = 1e-5


def shop_events(seed: int = 3) -> PreparedEvents:
    """Users who come back to products: a third of each user's events repeat one of theirs."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for user in range(200):
        own = rng.choice(60, 4, replace=False)
        for _ in range(rng.integers(6, 16)):
            users.append(10_000 + user)
            items.append(
                700 + int(own[rng.integers(4)] if rng.random() < 0.35 else rng.integers(60))
            )
    kinds = rng.choice([1.0, 3.0, 4.0], len(users), p=[0.8, 0.15, 0.05])
    times = 1_570_000_000 + np.arange(len(users)) * 600
    return PreparedEvents.from_events(np.array(users), np.array(items), kinds, times=times)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("history-model")
    cfg = TrainConfig(
        epochs=2, history=5, recent_events=20, num_embeddings=16, batch_size=256, eval_users=0,
        device="cpu", threads=1,
    )  # fmt: skip
    train(cfg, shop_events(), path, progress=False)
    return path


def pairs(rec) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with a repeat bonus, without one, and an unknown user and product."""
    users, items = [], []
    for row in range(0, len(rec.users), 7):
        touched, _ = rec.bonus.row(row)
        user = int(rec.users.ids_by_row[row])
        for item in touched[:3].tolist() + [0, 17]:
            users.append(user)
            items.append(int(rec.items.ids_by_row[item]))
    users += [1, 10_000]
    items += [700, 5]
    return np.array(users, np.int64), np.array(items, np.int64)


def csv_scores(text: str) -> np.ndarray:
    return np.array([float(v) if v else np.nan for v in text.splitlines()])


def same(got: np.ndarray, want: np.ndarray) -> None:
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=RTOL)


def test_every_path_gives_the_same_score(model_dir, mysql_url, tmp_path) -> None:
    rec = load_model(model_dir)
    assert rec.bonus is not None and len(rec.bonus.values) > 100
    users, items = pairs(rec)
    want = rec.score(users, items).astype(np.float64)
    touched = rec.bonus.lookup(rec.users.rows(users), np.maximum(rec.items.rows(items), 0))
    assert (touched != 0).sum() > 20 and (touched == 0).sum() > 20
    assert np.isnan(want[-2:]).all()
    body = "".join(f"{u},{i}\n" for u, i in zip(users.tolist(), items.tolist(), strict=True))

    with running(["--model-dir", str(model_dir), "--workers", "2"], tmp_path) as srv:
        same(csv_scores(srv.post("/invocations", body).text), want)
        doc = {"user_id": users.tolist(), "product_id": items.tolist()}
        reply = srv.post(
            "/invocations", json.dumps(doc), "application/json", Accept="application/json"
        )
        predictions = reply.json()["predictions"]
        same(np.array([np.nan if s is None else s for s in predictions], np.float64), want)

        user = int(users[0])
        top = srv.post(
            "/invocations", json.dumps({"user_id": user, "top_k": 20}), "application/json"
        )
        ranked = top.json()["predictions"][0]
        same(
            np.array(ranked["scores"]),
            rec.score(np.full(20, user), np.array(ranked["product_ids"])),
        )

        duck = duckdb.connect()
        install_duckdb_functions(duck, {"recsql": srv.url})
        duck.execute("CREATE TABLE pairs AS SELECT * FROM (VALUES " + ",".join(
            f"({k}, {u}, {i})" for k, (u, i) in enumerate(zip(users, items, strict=True))
        ) + ") t(k, u, i)")  # fmt: skip
        rows = duck.execute("SELECT will_purchase(u, i) FROM pairs ORDER BY k").fetchall()
        same(np.array([np.nan if r[0] is None else r[0] for r in rows]), want)

        conn = mysql_connect(mysql_url)
        vec_dir = Path(tempfile.mkdtemp(prefix="recsql-vec-"))
        vec_dir.chmod(0o755)
        http_name, vec_name = (f"rvec-one-{uuid.uuid4().hex[:8]}" for _ in range(2))
        write_vectors(rec, vec_dir / "model.vectors")
        allow = install_udf(
            conn,
            {http_name: Endpoint(srv.url), vec_name: Vectors(vec_dir / "model.vectors")},
            [],
            so_path=build_udf(),
        )
        try:
            for name in (http_name, vec_name):
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT recsql_invoke(%s, u, i) FROM (" + " UNION ALL ".join(
                            f"SELECT {k} AS k, {u} AS u, {i} AS i"
                            for k, (u, i) in enumerate(zip(users, items, strict=True))
                        ) + ") t ORDER BY k",
                        (name,),
                    )  # fmt: skip
                    got = [r[0] for r in cur.fetchall()]
                same(np.array([np.nan if v is None else float(v) for v in got]), want)
        finally:
            write_allow_list(allow, {}, remove=[http_name, vec_name])
            conn.close()
            shutil.rmtree(vec_dir, ignore_errors=True)

    # batch transform: the container as SageMaker runs it, MultiRecord CSV bodies
    with running(["--model-dir", str(model_dir)], tmp_path, {"SAGEMAKER_BATCH": "true"}) as srv:
        same(csv_scores(srv.post("/invocations", body).text), want)


def product_pairs(rec) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of known products (a product with itself among them), and unknown ones."""
    ids = rec.items.sorted_ids
    a = np.repeat(ids[::5], 4)
    b = ids[(np.arange(len(a)) * 7) % len(ids)]
    b[0] = a[0]
    return np.append(a, [1, int(ids[0]), 2]), np.append(b, [int(ids[1]), 5, 3])


def values_table(columns: dict[str, np.ndarray]) -> str:
    """A derived table of the columns, with k keeping the order (MariaDB and DuckDB)."""
    rows = zip(*(c.tolist() for c in columns.values()), strict=True)
    return " UNION ALL ".join(
        "SELECT "
        + ", ".join([f"{k} AS k", *(f"{v} AS {n}" for n, v in zip(columns, row, strict=True))])
        for k, row in enumerate(rows)
    )


def test_similar_score_is_the_same_on_every_path(model_dir, mysql_url, tmp_path) -> None:
    """similar_score(a, b): the cosine of the item tower's outputs, from the model, the
    endpoint (pairs with score=similar, and similar_to's top-K), DuckDB, MariaDB over HTTP
    and in-server (whose file's fallback policy does not apply: an unknown product is NULL),
    and ORDER BY similar_score(q, p) DESC LIMIT 10 ranks as similar_to does."""
    rec = load_model(model_dir)
    a, b = product_pairs(rec)
    want = rec.similarity(a, b).astype(np.float64)
    assert np.isnan(want[-3:]).all() and not np.isnan(want[:-3]).any()
    known = want[:-3]
    assert known[0] == pytest.approx(1.0) and 0.0 <= known.min() < 0.99 and known.max() <= 1.0
    body = "".join(f"{x},{y}\n" for x, y in zip(a.tolist(), b.tolist(), strict=True))
    query, products = int(a[0]), rec.items.sorted_ids
    expect_top = rec.top_similar(np.array([query]), 10)[0].tolist()
    table = values_table({"a": a, "b": b})

    with running(["--model-dir", str(model_dir), "--workers", "2"], tmp_path) as srv:
        reply = srv.post(
            "/invocations",
            body,
            "text/csv",
            **{"X-Amzn-SageMaker-Custom-Attributes": "score=similar"},
        )
        same(csv_scores(reply.text), want)
        top = srv.post(
            "/invocations", json.dumps({"similar_to": [query], "top_k": 10}), "application/json"
        ).json()["predictions"][0]
        assert top["product_ids"] == expect_top
        same(np.array(top["scores"]), rec.similarity(np.full(10, query), np.array(expect_top)))

        duck = duckdb.connect()
        install_duckdb_functions(duck, {"recsql": srv.url}, [SIMILAR_SCORE])
        rows = duck.execute(f"SELECT similar_score(a, b) FROM ({table}) t ORDER BY k").fetchall()
        same(np.array([np.nan if r[0] is None else r[0] for r in rows]), want)

        conn = mysql_connect(mysql_url)
        vec_dir = Path(tempfile.mkdtemp(prefix="recsql-vec-"))
        vec_dir.chmod(0o755)
        http_name, vec_name = (f"rsim-{uuid.uuid4().hex[:8]}" for _ in range(2))
        write_vectors(rec, vec_dir / "model.vectors", fallback="popularity")
        allow = install_udf(
            conn,
            {http_name: Endpoint(srv.url), vec_name: Vectors(vec_dir / "model.vectors")},
            [],
            so_path=build_udf(),
        )
        fn = dataclasses.replace(SIMILAR_SCORE, name=f"similar_{vec_name[5:]}", endpoint=vec_name)
        create_functions(conn, [fn], strict=False)
        try:
            for name in (http_name, vec_name):
                with conn.cursor() as cur:
                    cur.execute(
                        f"SELECT recsql_similar(%s, a, b) FROM ({table}) t ORDER BY k", (name,)
                    )
                    got = [r[0] for r in cur.fetchall()]
                    same(np.array([np.nan if v is None else float(v) for v in got]), want)
                    cur.execute("SELECT recsql_similar(%s, NULL, %s)", (name, query))
                    assert cur.fetchone()[0] is None
            with conn.cursor() as cur:
                cur.execute(
                    f"SELECT p FROM ({values_table({'p': products})}) t WHERE p <> %s"
                    f" ORDER BY {fn.name}(%s, p) DESC LIMIT 10",
                    (query, query),
                )
                assert [r[0] for r in cur.fetchall()] == expect_top
        finally:
            drop_functions(conn, [fn])
            write_allow_list(allow, {}, remove=[http_name, vec_name])
            conn.close()
            shutil.rmtree(vec_dir, ignore_errors=True)
