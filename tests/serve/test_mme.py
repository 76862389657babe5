"""Multi-model: the /models API across two gunicorn workers, next to a startup model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from model import load_model
from tests.model.test_mxnet import ITEM_IDS as SEED_ITEMS
from tests.model.test_mxnet import ITEM_ROWS as SEED_ITEM_ROWS
from tests.model.test_mxnet import USER_IDS as SEED_USERS
from tests.model.test_mxnet import USER_ROWS as SEED_USER_ROWS
from tests.model.test_mxnet import make_weights, reference_scores, write_seed_dir
from tests.serve.conftest import PRODUCT_IDS, USER_IDS, Server, make_artifact, running

PAIRS = f"{USER_IDS[1]},{PRODUCT_IDS[2]}\n{USER_IDS[5]},{PRODUCT_IDS[6]}\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_artifact(root / "m1" / "model", seed=1)
    make_artifact(root / "m2" / "model", seed=2)
    big = make_artifact(root / "big" / "model", seed=3)
    (big / "padding.bin").write_bytes(b"\0" * 2 * 1024 * 1024)  # over the 1 MB cap
    write_seed_dir(root / "seed" / "model", make_weights(0))
    return root


@pytest.fixture(scope="module")
def mme(model_dir, root, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("mme")
    args = ["--model-dir", str(model_dir), "--workers", "2", "--model-root", str(root)]
    env = {"SAGEMAKER_MULTI_MODEL": "true", "RECSQL_MAX_MODELS_MB": "1"}
    with running(args, tmp, env) as srv:
        yield srv


def fresh_post(srv: Server, path: str, body: str, **headers: str) -> requests.Response:
    """A new connection each time, so requests spread over both workers."""
    headers.setdefault("Content-Type", "text/csv")
    return requests.post(srv.url + path, data=body, headers=headers, timeout=30)


def scores_of(model_path: Path) -> str:
    rec = load_model(model_path)
    pairs = np.array([[int(x) for x in line.split(",")] for line in PAIRS.splitlines()])
    return "".join(f"{s:.7g}\n" for s in rec.score(pairs[:, 0], pairs[:, 1]).tolist())


def load(srv: Server, name: str, url: str) -> requests.Response:
    return srv.session.post(srv.url + "/models", json={"model_name": name, "url": url}, timeout=30)


def test_load_list_invoke_unload(mme, root) -> None:
    url = str(root / "m1" / "model")
    assert load(mme, "m1", url).status_code == 200
    assert load(mme, "m1", url).status_code == 409
    listed = mme.get("/models").json()["models"]
    assert {"modelName": "m1", "modelUrl": url} in listed
    assert listed[0]["modelName"] == "model"  # the startup model is held too
    assert mme.get("/models/m1").json()["kind"] == "mfblock"
    want = scores_of(root / "m1" / "model")
    for _ in range(8):
        assert fresh_post(mme, "/models/m1/invoke", PAIRS).text == want
        r = fresh_post(mme, "/invocations", PAIRS, **{"X-Amzn-SageMaker-Target-Model": "m1"})
        assert r.text == want
        assert fresh_post(mme, "/endpoints/m1/invocations", PAIRS).text == want
    assert mme.session.delete(mme.url + "/models/m1").status_code == 200
    for _ in range(8):  # every worker sees the unload
        r = fresh_post(mme, "/invocations", PAIRS, **{"X-Amzn-SageMaker-Target-Model": "m1"})
        assert r.status_code == 404
        assert fresh_post(mme, "/models/m1/invoke", PAIRS).status_code == 404
    assert mme.session.delete(mme.url + "/models/m1").status_code == 404
    assert mme.get("/models/m1").status_code == 404


def test_startup_model_is_the_default_and_cannot_be_unloaded(mme, model_dir) -> None:
    want = scores_of(model_dir)
    assert fresh_post(mme, "/invocations", PAIRS).text == want
    assert fresh_post(mme, "/endpoints/any-name/invocations", PAIRS).text == want
    assert mme.session.delete(mme.url + "/models/model").status_code == 409


@pytest.mark.parametrize(
    ("name", "url", "status"),
    [
        ("x", "/etc", 400),  # outside the model root
        ("x", "../", 400),
        ("x", "nope/model", 404),
        ("bad name!", "m2/model", 400),
        ("x", "", 400),
    ],
)
def test_bad_load_requests(mme, name, url, status) -> None:
    r = load(mme, name, url)
    assert r.status_code == status
    assert r.text.count("\n") == 1


def test_load_body_must_be_json(mme) -> None:
    r = mme.post("/models", "{", "application/json")
    assert r.status_code == 400


def test_memory_guard_answers_507(mme, root) -> None:
    r = load(mme, "big", str(root / "big" / "model"))
    assert r.status_code == 507
    assert "MB" in r.text
    assert all(m["modelName"] != "big" for m in mme.get("/models").json()["models"])


def test_seed_mxnet_artifact_serves_through_the_same_path(mme, root) -> None:
    assert load(mme, "seed", str(root / "seed" / "model")).status_code == 200
    weights = make_weights(0)
    idx = np.arange(min(len(SEED_USERS), len(SEED_ITEMS)))
    body = "".join(f"{u},{p}\n" for u, p in zip(SEED_USERS[idx], SEED_ITEMS[idx], strict=True))
    r = fresh_post(mme, "/models/seed/invoke", body)
    got = np.array([float(x) for x in r.text.split()])
    want = reference_scores(weights, SEED_USER_ROWS[idx], SEED_ITEM_ROWS[idx])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert mme.session.delete(mme.url + "/models/seed").status_code == 200


def test_loading_and_unloading_never_fails_other_requests(mme, root, model_dir) -> None:
    want = scores_of(model_dir)
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(mme.url + "/invocations", PAIRS, headers={"Content-Type": "text/csv"})
                if r.status_code != 200 or r.text != want:
                    failures.append(f"{r.status_code} {r.text!r}")

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            assert load(mme, "m2", str(root / "m2" / "model")).status_code == 200
            assert fresh_post(mme, "/models/m2/invoke", PAIRS).status_code == 200
            assert mme.session.delete(mme.url + "/models/m2").status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not failures


def test_listing_is_paged(mme, root) -> None:
    for name in ("p1", "p2"):
        assert load(mme, name, str(root / "m2" / "model")).status_code == 200
    try:
        page = mme.get("/models", params={"page_size": 2}).json()
        assert len(page["models"]) == 2 and page["nextPageToken"]
        rest = mme.get("/models", params={"next_page_token": page["nextPageToken"]}).json()
        names = [m["modelName"] for m in page["models"] + rest["models"]]
        assert names == ["model", "p1", "p2"] and "nextPageToken" not in rest
    finally:
        for name in ("p1", "p2"):
            mme.session.delete(mme.url + f"/models/{name}")


def test_models_api_is_off_without_multi_model(server) -> None:
    r = server.get("/models")
    assert r.status_code == 404 and "SAGEMAKER_MULTI_MODEL" in r.text


def test_several_models_without_a_default_need_a_target(root, tmp_path) -> None:
    args = ["--multi-model", "--model-root", str(root), "--workers", "1"]
    with running(args, tmp_path) as srv:
        assert srv.get("/ping").status_code == 200  # ready to take models
        assert srv.post("/invocations", PAIRS).status_code == 404  # nothing loaded yet
        assert load(srv, "a", "m1/model").status_code == 200  # relative to the root
        assert srv.post("/invocations", PAIRS).text == scores_of(root / "m1" / "model")
        assert load(srv, "b", "m2/model").status_code == 200
        r = srv.post("/invocations", PAIRS)
        assert r.status_code == 400 and "X-Amzn-SageMaker-Target-Model" in r.text
        assert srv.post("/endpoints/b/invocations", PAIRS).text == scores_of(root / "m2" / "model")
