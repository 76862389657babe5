"""Production variants (A/B) and a shadow variant: routing, split batches, headers, metrics,
SQL through a two-variant server. Real gunicorn on loopback, real DuckDB and MariaDB."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import requests

from db.duckdb_udf import install_duckdb_functions
from model import load_model
from model.errors import BadRequest, RecsqlError
from model.variants import route_key, route_users, user_fractions
from serve import DataPlane, Invocation, build_dataplane, from_env
from serve.capture import iter_records
from serve.handlers import VARIANT_HEADER
from tests.serve.conftest import PRODUCT_IDS, ROOT, USER_IDS, make_artifact, running
from tests.serve.test_ops import metric

WEIGHTS = [1.0, 3.0]  # a:b = 1:3


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different models of the same users and products (seeds 1 and 2)."""
    root = tmp_path_factory.mktemp("variants")
    return {name: make_artifact(root / name, seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def scorers(models: dict[str, Path]) -> list:
    return [load_model(models["a"]), load_model(models["b"])]


def variant_args(models: dict[str, Path]) -> list[str]:
    return ["--variant", f"a={models['a']}:1", "--variant", f"b={models['b']}:3"]


@pytest.fixture(scope="module")
def plane(models: dict[str, Path]) -> DataPlane:
    config = from_env({}, variants=[f"a={models['a']}:1", f"b={models['b']}:3"])
    return build_dataplane(config)


def expected(users: np.ndarray, products: np.ndarray, scorers: list) -> np.ndarray:
    """Each pair scored by its user's variant's model."""
    chosen = route_users(users, WEIGHTS)
    want = np.empty(len(users))
    for i, scorer in enumerate(scorers):
        rows = chosen == i
        want[rows] = scorer.score(users[rows], products[rows])
    return want


# ------------------------------------------------------------------ routing (model/variants.py)


def test_route_is_md5_of_the_decimal_id_and_stable_across_runs() -> None:
    # pinned: Python's hash() would change with every process (PYTHONHASHSEED)
    assert user_fractions(np.array([10_000]))[0] == 3230881217115751 / 2**52
    ids = np.array([0, -5, 2**63 - 1, 123_456_789_012], dtype=np.int64)
    by_hand = [int(hashlib.md5(str(u).encode()).hexdigest()[:13], 16) / 2**52 for u in ids]
    assert user_fractions(ids).tolist() == by_hand


def test_weights_are_honoured_within_a_binomial_bound() -> None:
    users = np.arange(4000, dtype=np.int64) * 13 + 1
    chosen = route_users(users, WEIGHTS)
    # share of a = 1/4: mean 1000, sd sqrt(4000 * 1/4 * 3/4) = 27.4; 4 sd either side
    assert abs(int((chosen == 0).sum()) - 1000) < 110
    assert set(chosen.tolist()) == {0, 1}
    assert not (route_users(users, [1.0, 0.0, 1.0]) == 1).any()  # weight 0: no traffic
    assert (route_users(users[:50], WEIGHTS) == chosen[:50]).all()  # a user's own, per call


def test_bad_variant_specs_are_clear_errors(models: dict[str, Path]) -> None:
    bad = {
        "a": "write NAME=DIR[:WEIGHT]",
        "=x": "write NAME=DIR[:WEIGHT]",
        "a=/m:-1": "weight '-1' must be a number >= 0",
        "a=/m:heavy": "weight 'heavy' must be a number >= 0",
        "a_b=/m": "variant name 'a_b' is not valid",
        "-a=/m": "variant name '-a' is not valid",
        "a=/m:0": "positive sum",
    }
    for spec, reason in bad.items():
        with pytest.raises(RecsqlError, match=re.escape(reason)):
            from_env({}, variants=[spec])
    with pytest.raises(RecsqlError, match="a given twice"):
        from_env({}, variants=["a=/m", "a=/n"])
    with pytest.raises(RecsqlError, match="not both"):
        from_env({}, model_dir=Path("/m"), variants=["a=/n"])
    with pytest.raises(RecsqlError, match="takes no weight"):
        from_env({}, model_dir=Path("/m"), shadow="s=/n:2")
    with pytest.raises(RecsqlError, match="use one or the other"):
        from_env({}, variants=["a=/n"], multi_model=True)
    env = {"RECSQL_VARIANTS": "a=/m/a:0.5, b=/m/b", "RECSQL_CONTAINER": "true"}
    config = from_env(env)
    assert [(v.name, str(v.model_dir), v.weight) for v in config.production_variants] == [
        ("a", "/m/a", 0.5),
        ("b", "/m/b", 1.0),
    ]
    assert config.model_dir is None  # not the container's /opt/ml/model as well
    # the CLI: exit 1 with the reason on one line
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "RECSQL_"))}
    run = subprocess.run(
        [sys.executable, "-m", "serve", "--variant", f"a={models['a']}:x"],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert f"recsql serve: error: --variant 'a={models['a']}:x': weight 'x'" in run.stderr


# ------------------------------------------------------------------ the dataplane, in-process


def test_split_batch_is_reassembled_in_order(plane: DataPlane, scorers: list) -> None:
    rng = np.random.default_rng(0)
    users = rng.choice(USER_IDS, 300)
    products = rng.choice(PRODUCT_IDS, 300)
    lines = [f"{u},{p}" for u, p in zip(users, products, strict=True)]
    lines[7] = "not,a pair"  # no user to read: the request's own variant, null either way
    reply = plane.invoke(Invocation(("\n".join(lines) + "\n").encode(), "text/csv"))
    assert reply.headers[VARIANT_HEADER] == "a,b"
    assert reply.headers["X-Recsql-Malformed-Rows"] == "1"
    got = np.array([float(x) if x else np.nan for x in reply.body.decode().split("\n")[:-1]])
    want = expected(users, products, scorers)
    want[7] = np.nan
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_top_k_with_per_user_lists_follows_each_users_variant(
    plane: DataPlane, scorers: list
) -> None:
    users = [int(u) for u in USER_IDS[:12]]
    exclude = [[int(PRODUCT_IDS[i])] for i in range(12)]
    doc = {"user_id": users, "top_k": 3, "exclude": exclude}
    reply = plane.invoke(Invocation(json.dumps(doc).encode(), "application/json"))
    chosen = route_users(np.array(users), WEIGHTS)
    assert len(set(chosen.tolist())) == 2  # both variants answered part of it
    got = json.loads(reply.body)["predictions"]
    for row, user in enumerate(users):
        best = scorers[chosen[row]].top_k(user, 3, None, np.array(exclude[row]))
        assert got[row]["user_id"] == user
        assert got[row]["product_ids"] == best[0].tolist()


def test_target_variant_overrides_and_unknown_names_the_variants(
    plane: DataPlane, scorers: list
) -> None:
    users, products = USER_IDS[:40], PRODUCT_IDS[:40]
    body = "".join(f"{u},{p}\n" for u, p in zip(users, products, strict=True)).encode()
    reply = plane.invoke(Invocation(body, "text/csv", target_variant="a"))
    assert reply.headers[VARIANT_HEADER] == "a"
    got = np.array(reply.body.decode().split(), dtype=float)
    np.testing.assert_allclose(got, scorers[0].score(users, products), rtol=1e-6)
    with pytest.raises(BadRequest, match="'c' is not a variant of this endpoint; variants: a, b"):
        plane.invoke(Invocation(body, "text/csv", target_variant="c"))


def test_requests_without_users_go_by_inference_id(plane: DataPlane, scorers: list) -> None:
    doc = json.dumps({"similar_to": [int(PRODUCT_IDS[3])], "top_k": 4}).encode()
    for inference_id in ("r-1", "r-2", "r-3", "r-4"):
        reply = plane.invoke(Invocation(doc, "application/json", inference_id=inference_id))
        index = route_key(inference_id.encode(), WEIGHTS)
        assert reply.headers[VARIANT_HEADER] == "ab"[index]
        ranked = scorers[index].top_similar(np.array([PRODUCT_IDS[3]]), 4, None, None)
        assert json.loads(reply.body)["predictions"][0]["product_ids"] == ranked[0].tolist()


def test_fresh_events_are_taken_once(plane: DataPlane) -> None:
    user = int(USER_IDS[5])
    events = [{"user_id": user, "product_id": int(PRODUCT_IDS[i])} for i in range(3)]
    reply = plane.invoke(Invocation(json.dumps({"events": events}).encode(), "application/json"))
    assert json.loads(reply.body) == {"taken": 3, "users": 1}
    assert reply.headers[VARIANT_HEADER] in ("a", "b") and reply.after is None
    assert len(plane.events.lookup(np.array([user]))[user]) == 3


def test_capture_records_each_variants_part(
    models: dict[str, Path], scorers: list, tmp_path: Path
) -> None:
    config = from_env(
        {"RECSQL_CAPTURE_MAX_MB": "8", "RECSQL_CAPTURE_MAX_FILE_MB": "1"},
        variants=[f"a={models['a']}:1", f"b={models['b']}:3"],
        capture_dir=tmp_path / "capture",
    )
    plane = build_dataplane(config)
    assert (plane.capture.max_file_bytes, plane.capture.max_total_bytes) == (2**20, 8 * 2**20)
    users, products = USER_IDS[:30], PRODUCT_IDS[:30]
    body = "".join(f"{u},{p}\n" for u, p in zip(users, products, strict=True)).encode()
    plane.invoke(Invocation(body, "text/csv", inference_id="cap-1"))
    plane.capture.close()
    records = sorted(iter_records(tmp_path / "capture"), key=lambda r: r["variant"])
    assert [r["variant"] for r in records] == ["a", "b"]
    for record in records:
        data = record["captureData"]
        given, answer = data["endpointInput"], data["endpointOutput"]
        pairs = np.array([line.split(",") for line in given["data"].split()], dtype=np.int64)
        index = "ab".index(record["variant"])
        assert (route_users(pairs[:, 0], WEIGHTS) == index).all()
        assert record["eventMetadata"]["inferenceId"] == "cap-1"
        assert given["observedContentType"] == answer["observedContentType"] == "text/csv"
        got = np.array(answer["data"].split(), dtype=float)
        np.testing.assert_allclose(got, scorers[index].score(pairs[:, 0], pairs[:, 1]), rtol=1e-6)
    assert sum(len(r["captureData"]["endpointInput"]["data"].split()) for r in records) == 30


def test_in_process_shadow_runs_after_the_reply(models: dict[str, Path]) -> None:
    plane = build_dataplane(from_env({}, model_dir=models["a"], shadow=f"s={models['b']}"))
    reply = plane.invoke(Invocation(f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n".encode(), "text/csv"))
    assert reply.headers[VARIANT_HEADER] == "AllTraffic"
    labels = {"model": "model", "variant": "s", "status": "200"}
    assert metric(plane.metrics.render(), "recsql_requests_total", **labels) == 0
    assert reply.after is not None
    reply.after()  # what the server starts once the reply is sent
    assert metric(plane.metrics.render(), "recsql_requests_total", **labels) == 1


# ------------------------------------------------------------------ over HTTP


def test_same_user_same_variant_across_workers_and_restarts(
    models: dict[str, Path], tmp_path: Path
) -> None:
    users = USER_IDS[:40]
    want = ["ab"[i] for i in route_users(users, WEIGHTS)]
    for _ in range(2):  # a restart changes nothing
        args = [*variant_args(models), "--workers", "2"]
        with running(args, tmp_path) as srv:
            got = []
            for user in users:  # new connections: both workers take some
                reply = requests.post(
                    srv.url + "/invocations",
                    f"{user},{PRODUCT_IDS[0]}\n",
                    headers={"Content-Type": "text/csv"},
                    timeout=30,
                )
                got.append(reply.headers[VARIANT_HEADER])
            pids = {
                line.split("[")[1].split("]")[0]
                for line in srv.log().splitlines()
                if "invocations model=" in line
            }
        assert got == want
        assert len(pids) == 2


@pytest.fixture(scope="module")
def two_variants(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("two-variants")
    with running([*variant_args(models), "--workers", "2"], tmp) as srv:
        yield srv


def wait_for_metric(srv, name: str, want: float, **labels: str) -> str:
    """/metrics once `name{labels}` reaches `want` (workers write theirs once a second)."""
    deadline = time.monotonic() + 20
    while True:
        text = srv.get("/metrics").text
        if metric(text, name, **labels) >= want or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_http_split_batch_headers_and_metrics(two_variants, scorers: list) -> None:
    srv = two_variants
    users = np.repeat(USER_IDS[:50], 4)
    products = np.tile(PRODUCT_IDS[:4], 50)
    body = "".join(f"{u},{p}\n" for u, p in zip(users, products, strict=True))
    reply = srv.post("/invocations", body)
    assert reply.status_code == 200 and reply.headers[VARIANT_HEADER] == "a,b"
    got = np.array(reply.text.split(), dtype=float)
    np.testing.assert_allclose(got, expected(users, products, scorers), rtol=1e-6)
    per_variant = np.bincount(route_users(users, WEIGHTS), minlength=2)
    text = wait_for_metric(
        srv, "recsql_rows_total", float(per_variant[1]), model="model", variant="b"
    )
    for name, rows in zip("ab", per_variant.tolist(), strict=True):
        assert metric(text, "recsql_rows_total", model="model", variant=name) == rows
        assert metric(text, "recsql_requests_total", model="model", variant=name, status="200")
    unknown = srv.post("/invocations", body, **{"X-Amzn-SageMaker-Target-Variant": "nope"})
    assert unknown.status_code == 400 and "variants: a, b" in unknown.text
    assert VARIANT_HEADER not in unknown.headers  # refused before any variant was chosen
    targeted = srv.post("/invocations", body, **{"X-Amzn-SageMaker-Target-Variant": "b"})
    assert targeted.headers[VARIANT_HEADER] == "b"
    np.testing.assert_allclose(
        np.array(targeted.text.split(), dtype=float), scorers[1].score(users, products), rtol=1e-6
    )


def test_plain_model_dir_answers_as_alltraffic_errors_included(server) -> None:
    ok = server.post("/invocations", f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n")
    assert ok.headers[VARIANT_HEADER] == "AllTraffic"
    refused = server.post("/invocations", "x", content_type="text/plain")
    assert refused.status_code == 415 and refused.headers[VARIANT_HEADER] == "AllTraffic"
    routed = server.post("/endpoints/model/invocations", f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n")
    assert routed.headers[VARIANT_HEADER] == "AllTraffic"


# A shadow that waits until the test releases it, and fails when asked to.
SHADOW_SCRIPT = """
import os
import time


def model_fn(model_dir):
    return model_dir


def transform_fn(model_dir, data, content_type, accept, context):
    release = os.path.join(model_dir, "release")
    while not os.path.exists(release):
        time.sleep(0.05)
    if context.get_request_header(0, "X-Amzn-SageMaker-Custom-Attributes") == "shadow=fail":
        raise ValueError("shadow exploded")
    return "1\\n" * len(data.splitlines()), "text/csv"
"""


def test_shadow_scores_off_the_reply_path(models: dict[str, Path], tmp_path: Path) -> None:
    shadow_dir = tmp_path / "shadow"
    (shadow_dir / "code").mkdir(parents=True)
    (shadow_dir / "code" / "inference.py").write_text(textwrap.dedent(SHADOW_SCRIPT))
    args = ["--model-dir", str(models["a"]), "--shadow", f"slow={shadow_dir}", "--workers", "1"]
    body = f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n{USER_IDS[1]},{PRODUCT_IDS[1]}\n"
    shadow_ok = {"model": "model", "variant": "slow", "status": "200"}
    with running(args, tmp_path) as srv:
        reply = srv.post("/invocations", body)
        # answered while the shadow still waits for its release: the caller waited for nobody
        assert reply.status_code == 200 and reply.headers[VARIANT_HEADER] == "AllTraffic"
        want = load_model(models["a"]).score(USER_IDS[:2], PRODUCT_IDS[:2])
        np.testing.assert_allclose(np.array(reply.text.split(), dtype=float), want, rtol=1e-6)
        assert metric(srv.get("/metrics").text, "recsql_requests_total", **shadow_ok) == 0
        (shadow_dir / "release").write_text("")
        text = wait_for_metric(srv, "recsql_requests_total", 1, **shadow_ok)
        assert metric(text, "recsql_requests_total", **shadow_ok) == 1
        assert metric(text, "recsql_rows_total", model="model", variant="AllTraffic") == 2
        broken = srv.post(
            "/invocations", body, **{"X-Amzn-SageMaker-Custom-Attributes": "shadow=fail"}
        )
        assert broken.status_code == 200 and broken.text == reply.text
        failed = {"model": "model", "variant": "slow", "status": "500"}
        assert wait_for_metric(srv, "recsql_errors_total", 1, **failed)
        assert metric(srv.get("/metrics").text, "recsql_errors_total", **failed) == 1
        assert "shadow variant 'slow' failed" in srv.log()
        assert "variant=slow" in srv.log()
        assert srv.get("/ping").status_code == 200


# ------------------------------------------------------------------ SQL


def test_duckdb_scores_each_user_with_their_variant(two_variants, scorers: list) -> None:
    con = duckdb.connect()
    install_duckdb_functions(con, {"recsql": two_variants.url})
    con.execute(
        "CREATE TABLE pairs AS SELECT u.user_id, p.product_id"
        " FROM (SELECT unnest($u) AS user_id) u, (SELECT unnest($p) AS product_id) p",
        {"u": USER_IDS[:120].tolist(), "p": PRODUCT_IDS[:20].tolist()},
    )
    rows = con.execute(
        "SELECT user_id, product_id, will_purchase(user_id, product_id) FROM pairs"
        " ORDER BY user_id, product_id"
    ).fetchall()
    con.close()
    users = np.array([r[0] for r in rows])
    products = np.array([r[1] for r in rows])
    got = np.array([r[2] for r in rows], dtype=float)
    np.testing.assert_allclose(got, expected(users, products, scorers), rtol=1e-5, atol=1e-7)
    assert len(set(route_users(users, WEIGHTS).tolist())) == 2


@pytest.mark.mysql
def test_mysql_md5_routes_users_as_the_server_does() -> None:
    """The routing rule written in SQL (README "Variants", for Aurora) gives the server's."""
    from db.load import mysql_connect

    url = os.environ.get("RECSQL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
    try:
        conn = mysql_connect(url, connect_timeout=3)
    except Exception as exc:  # any reason the server cannot be used
        pytest.skip(f"no MariaDB/MySQL server at {url}: {exc}")
    users = np.concatenate([USER_IDS[:100], [-3, 0, 2**63 - 1]])
    threshold = 2**52 * WEIGHTS[0] / sum(WEIGHTS)  # a's share of the hash range
    try:
        with conn.cursor() as cur:
            got = []
            for user in users.tolist():
                cur.execute(
                    "SELECT IF(CONV(LEFT(MD5(%s), 13), 16, 10) < %s, 'a', 'b')",
                    (user, threshold),
                )
                got.append(cur.fetchone()[0])
    finally:
        conn.close()
    assert got == ["ab"[i] for i in route_users(users, WEIGHTS)]
