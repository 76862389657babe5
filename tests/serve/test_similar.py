"""Similar products behind the server: `similar_to` top-K with exclude / candidates /
unknown products, `score=similar` pairs, the 400s, and every recommender kind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model import load_model
from model.errors import BadRequest
from serve import Invocation, build_dataplane, from_env
from tests.model.test_mxnet import make_weights, write_seed_dir

from .conftest import PRODUCT_IDS, make_artifact, running

SIMILAR = "score=similar"


@pytest.fixture(scope="module")
def rec(history_dir):
    return load_model(history_dir)


@pytest.fixture(scope="module")
def server(history_dir, tmp_path_factory):
    with running(
        ["--model-dir", str(history_dir), "--workers", "1"], tmp_path_factory.mktemp("s")
    ) as srv:
        yield srv


def ask(srv, doc: dict):
    reply = srv.post("/invocations", json.dumps(doc), "application/json")
    assert reply.status_code == 200, reply.text
    return reply.json()["predictions"], reply.headers


def test_similar_to_ranks_by_cosine_without_the_query(server, rec) -> None:
    query = int(PRODUCT_IDS[3])
    (got,), headers = ask(server, {"similar_to": [query], "top_k": 8})
    assert got["ranked_by"] == "similar" and got["user_id"] is None
    want, _ = rec.top_similar(np.array([query]), 8)
    assert got["product_ids"] == want.tolist() and query not in got["product_ids"]
    cosine = rec.similarity(np.full(8, query), np.array(got["product_ids"]))
    np.testing.assert_allclose(got["scores"], cosine, rtol=1e-5)
    assert np.all(np.diff(got["scores"]) <= 0)
    assert headers["X-Recsql-Fallback-Rows"] == "0"


def test_exclude_candidates_and_unknown_products(server, rec) -> None:
    a, b, c = (int(p) for p in PRODUCT_IDS[[3, 10, 20]])
    best, _ = rec.top_similar(np.array([a, b]), 4)
    candidates = [int(p) for p in PRODUCT_IDS[30:60]] + [a, 1]
    doc = {
        "similar_to": [[a, b, 1], [1, 2], [c]],  # 1 and 2: unknown products
        "top_k": 4,
        "exclude": [best[:2].tolist(), [], []],
        "candidates": [[int(p) for p in PRODUCT_IDS], [int(p) for p in PRODUCT_IDS], candidates],
    }
    (mixed, unknown, restricted), headers = ask(server, doc)
    assert mixed["ranked_by"] == "similar"
    assert mixed["product_ids"] == rec.top_similar(np.array([a, b]), 6)[0][2:].tolist()
    ids = np.array(mixed["product_ids"])
    mean = (rec.similarity(np.full(4, a), ids) + rec.similarity(np.full(4, b), ids)) / 2
    np.testing.assert_allclose(mixed["scores"], mean, rtol=1e-5)
    assert unknown["ranked_by"] == "popularity"
    assert unknown["product_ids"] == rec.rank_vector(None, 4)[0].tolist()
    assert set(restricted["product_ids"]) <= set(candidates) - {c, 1}
    assert (
        restricted["product_ids"]
        == rec.top_similar(np.array([c]), 4, np.array(candidates))[0].tolist()
    )
    assert headers["X-Recsql-Fallback-Rows"] == "1" and headers["X-Recsql-Unknown-Rows"] == "1"


def test_pairs_scored_as_similar_through_the_custom_attribute(server, rec) -> None:
    """What the SQL functions send: CSV pairs of products, score=similar in the header
    SageMaker forwards; an unknown product or a bad row is an empty line."""
    a, b = PRODUCT_IDS[:6], PRODUCT_IDS[40:46]
    body = "".join(f"{x},{y}\n" for x, y in zip(a, b, strict=True)) + f"1,{a[0]}\n{a[0]},x\n"
    headers = {"X-Amzn-SageMaker-Custom-Attributes": SIMILAR}
    reply = server.post("/invocations", body, "text/csv", **headers)
    lines = reply.text.split("\n")
    assert reply.status_code == 200 and len(lines) == 9 and lines[6:] == ["", "", ""]
    np.testing.assert_allclose([float(v) for v in lines[:6]], rec.similarity(a, b), rtol=1e-6)
    assert reply.headers["X-Recsql-Unknown-Rows"] == "1"
    assert reply.headers["X-Recsql-Malformed-Rows"] == "1"
    doc = {"score": "similar", "product_a": a.tolist(), "product_b": b.tolist()}
    got, _ = ask(server, doc)
    np.testing.assert_allclose(got, rec.similarity(a, b), rtol=1e-6)
    plain = server.post("/invocations", f"{a[0]},{b[0]}\n", "text/csv").text.strip()
    assert plain == ""  # the same record without the attribute is a (user, product) pair


@pytest.fixture(scope="module")
def plane(history_dir):
    return build_dataplane(from_env({}, model_dir=history_dir))


@pytest.mark.parametrize(
    "doc, attributes, match",
    [
        ({"similar_to": [], "top_k": 3}, None, "non-empty list"),
        ({"similar_to": 5, "top_k": 3}, None, "non-empty list"),
        ({"similar_to": [1.5], "top_k": 3}, None, "integer product ids"),
        ({"similar_to": ["7"], "top_k": 3}, None, "integer product ids"),
        ({"similar_to": [[1], []], "top_k": 3}, None, "at least one product id"),
        ({"similar_to": [[1], 2], "top_k": 3}, None, "integer product ids"),
        ({"similar_to": [1]}, None, 'needs "top_k"'),
        ({"similar_to": [1], "history": [1], "top_k": 3}, None, "not both"),
        ({"similar_to": [[1], [2]], "top_k": 3, "exclude": [[1]]}, None, "1 lists for 2"),
        ({"score": "cosine", "product_a": [1], "product_b": [2]}, None, "score 'cosine'"),
        ({"product_a": [1], "top_k": 3}, SIMILAR, "similar_to"),
    ],
)
def test_bad_similar_requests_are_400(plane, doc, attributes, match) -> None:
    with pytest.raises(BadRequest, match=match) as raised:
        plane.invoke(Invocation(json.dumps(doc).encode(), "application/json", None, attributes))
    assert raised.value.status == 400


def test_every_recommender_kind(tmp_path) -> None:
    """A per-user embedding model and a seed MXNet artifact answer similar_to too."""
    dirs = [make_artifact(tmp_path / "plain"), write_seed_dir(tmp_path / "seed", make_weights())]
    for model_dir in dirs:
        model = load_model(model_dir)
        query = int(model.items.sorted_ids[0])
        plane = build_dataplane(from_env({}, model_dir=model_dir))
        doc = {"similar_to": [query], "top_k": 3}
        reply = plane.invoke(Invocation(json.dumps(doc).encode(), "application/json"))
        (got,) = json.loads(reply.body)["predictions"]
        assert got["ranked_by"] == "similar"
        assert got["product_ids"] == model.top_similar(np.array([query]), 3)[0].tolist()
        pair = plane.invoke(Invocation(f"{query},{query}\n".encode(), "text/csv", None, SIMILAR))
        assert float(pair.body) == pytest.approx(1.0, rel=1e-6)
