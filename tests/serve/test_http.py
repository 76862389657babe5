"""/ping and /invocations over real HTTP, as Aurora, batch transform and users send them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.records import split_records
from tests.serve.conftest import GLOBAL_MEAN, PRODUCT_IDS, USER_IDS


def csv_values(body: bytes) -> list[float | None]:
    return [float(x) if x else None for x in body.decode().split("\n")[:-1]]


def expected(recommender, users, products) -> list[float | None]:
    scores = recommender.score(np.asarray(users, np.int64), np.asarray(products, np.int64))
    return [None if np.isnan(s) else float(s) for s in scores]


def assert_scores(got: list[float | None], want: list[float | None]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None), (got, want)
        if w is not None:
            assert g == pytest.approx(w, rel=1e-5, abs=1e-6)


def test_ping_is_empty_200(server) -> None:
    r = server.get("/ping")
    assert r.status_code == 200
    assert r.content == b""


@pytest.mark.parametrize("content_type", ["text/csv", "text/csv; charset=utf-8", "TEXT/CSV"])
def test_csv_pairs_score_in_order(server, recommender, content_type: str) -> None:
    users, products = USER_IDS[[3, 1, 2, 3]], PRODUCT_IDS[[10, 20, 30, 40]]
    body = "".join(f"{u},{p}\n" for u, p in zip(users, products, strict=True))
    r = server.post("/invocations", body, content_type)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/csv")
    assert_scores(csv_values(r.content), expected(recommender, users, products))
    assert r.headers["X-Recsql-Null-Rows"] == "0"


def test_bad_rows_keep_their_place_and_are_counted(server, recommender) -> None:
    u, p = int(USER_IDS[5]), int(PRODUCT_IDS[7])
    lines = [
        f"{u},{p}",  # good
        f"{u},",  # NULL product (Aurora sends NULL as an empty field)
        "",  # empty line
        f"abc,{p}",  # not an id
        f"{u},{p},99",  # extra field: refused, never re-aligned
        f"{u}",  # missing field
        f"1,{p}",  # unknown user
        f'"{u}","{p}"',  # quoted fields are fine
        f"{u},99999999999999999999",  # out of int64 range
        f" {u} , {p} ",  # spaces around ids are fine
        f"{u}.0,{p}",  # an integral float is an id
    ]
    r = server.post("/invocations", "\r\n".join(lines) + "\r\n")
    assert r.status_code == 200
    got = csv_values(r.content)
    good = expected(recommender, [u], [p])[0]
    assert_scores(got, [good, None, None, None, None, None, None, good, None, good, good])
    assert r.headers["X-Recsql-Malformed-Rows"] == "6"
    assert r.headers["X-Recsql-Unknown-Rows"] == "1"
    assert r.headers["X-Recsql-Null-Rows"] == "7"


def test_trailing_newline_is_not_a_record(server) -> None:
    u, p = USER_IDS[0], PRODUCT_IDS[0]
    with_newline = server.post("/invocations", f"{u},{p}\n{u},{p}\n").content
    without = server.post("/invocations", f"{u},{p}\n{u},{p}").content
    assert with_newline == without
    assert len(split_records(with_newline)) == 2
    assert server.post("/invocations", "").content == b""
    assert server.post("/invocations", "\n").content == b"\n"  # one empty record


def test_aurora_batch_of_10000_lines(server, recommender) -> None:
    rng = np.random.default_rng(1)
    users = rng.choice(USER_IDS, 10_000)
    products = rng.choice(PRODUCT_IDS, 10_000)
    users[::97] = 3  # unknown user
    lines = [f"{u},{p}" for u, p in zip(users, products, strict=True)]
    for i in range(5, 10_000, 501):
        lines[i] = f"{users[i]},"  # NULL argument
    r = server.post("/invocations", "\n".join(lines) + "\n", Accept="text/csv")
    assert r.status_code == 200
    got = csv_values(r.content)
    want = expected(recommender, users, products)
    for i in range(5, 10_000, 501):
        want[i] = None
    assert_scores(got, want)
    assert int(r.headers["X-Recsql-Null-Rows"]) == sum(w is None for w in want)


def test_six_megabyte_body(server, recommender) -> None:
    limit = 6 * 1024 * 1024
    line = f"{USER_IDS[1]},{PRODUCT_IDS[2]}\n".encode()
    body = line * (limit // len(line))
    body += b"\n" * (limit - len(body))  # exactly at the limit
    r = server.post("/invocations", body)
    assert r.status_code == 200
    assert len(split_records(r.content)) == len(split_records(body))
    over = server.post("/invocations", body + line)
    assert over.status_code == 413
    assert over.text.count("\n") == 1 and "limit" in over.text


def test_json_columns_and_instances(server, recommender) -> None:
    users, products = USER_IDS[[1, 2]].tolist(), PRODUCT_IDS[[3, 4]].tolist()
    want = expected(recommender, users + [1], products + [products[0]])
    r = server.post(
        "/invocations",
        json.dumps({"user_id": users + [1], "product_id": products + [products[0]]}),
        "application/json",
    )
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert_scores(r.json()["predictions"], want)
    instances = [[u, p] for u, p in zip(users, products, strict=True)] + [[1, products[0]], "x"]
    r = server.post("/invocations", json.dumps({"instances": instances}), "application/json")
    assert_scores(r.json()["predictions"], want + [None])


def test_jsonlines_line_by_line(server, recommender) -> None:
    u, p = int(USER_IDS[9]), int(PRODUCT_IDS[9])
    body = f'[{u},{p}]\n{{"user_id":{u},"product_id":{p}}}\nnot json\n[{u}]\n'
    r = server.post("/invocations", body, "application/jsonlines")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/jsonlines"
    got = [json.loads(line) for line in r.text.splitlines()]
    good = expected(recommender, [u], [p])[0]
    assert_scores(got, [good, good, None, None])


def test_npy_array(server, recommender) -> None:
    pairs = np.stack([USER_IDS[:5], PRODUCT_IDS[:5]], axis=1)
    buf = io.BytesIO()
    np.save(buf, pairs)
    r = server.post("/invocations", buf.getvalue(), "application/x-npy", Accept="application/json")
    assert_scores(r.json()["predictions"], expected(recommender, pairs[:, 0], pairs[:, 1]))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused = server.post("/invocations", buf.getvalue(), "application/x-npy")
    assert refused.status_code == 400  # pickled objects are never loaded


def test_top_k_with_candidates_and_exclude(server, recommender) -> None:
    users = [int(USER_IDS[4]), int(USER_IDS[8]), 1]
    r = server.post("/invocations", json.dumps({"user_id": users, "top_k": 5}), "application/json")
    assert r.status_code == 200
    answers = r.json()["predictions"]
    for answer, user in zip(answers[:2], users[:2], strict=True):
        ids, scores = recommender.top_k(user, 5)
        assert answer["user_id"] == user
        assert answer["product_ids"] == ids.tolist()
        assert answer["scores"] == pytest.approx(scores.tolist(), rel=1e-5)
    assert answers[2] == {"user_id": 1, "product_ids": [], "scores": []}
    best = answers[0]["product_ids"]
    doc = {"user_id": users[0], "top_k": 3, "exclude": best[:2]}
    again = server.post("/invocations", json.dumps(doc), "application/json").json()
    assert again["predictions"][0]["product_ids"] == best[2:5]
    candidates = PRODUCT_IDS[100:110].tolist()
    doc = {"user_id": [users[0]], "top_k": 20, "candidates": candidates}
    only = server.post("/invocations", json.dumps(doc), "application/json").json()
    assert sorted(only["predictions"][0]["product_ids"]) == candidates


def test_top_k_from_a_history(server, recommender) -> None:
    history = PRODUCT_IDS[[3, 40, 41]].tolist() + [7]  # 7: a product the model does not know
    doc = {"history": [history, [1, 2]], "top_k": 5, "exclude": [history[:1], []]}
    r = server.post("/invocations", json.dumps(doc), "application/json")
    assert r.status_code == 200
    folded, fallback = r.json()["predictions"]
    user = recommender.fold_in(np.array(history))
    assert user.known_items == 3
    ids, scores = recommender.rank_vector(user.vector, 5, exclude=np.array(history[:1]))
    assert folded["ranked_by"] == "history" and folded["user_id"] is None
    assert folded["product_ids"] == ids.tolist() and history[0] not in folded["product_ids"]
    assert folded["scores"] == pytest.approx(scores.tolist(), rel=1e-5)
    # no product the model knows: the popularity ranking, and the reply says so
    assert fallback["ranked_by"] == "popularity"
    popular = PRODUCT_IDS[np.argsort(-recommender.item_popularity, kind="stable")[:5]]
    assert fallback["product_ids"] == popular.tolist()
    assert r.headers["X-Recsql-Fallback-Rows"] == "1"


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"history": [], "top_k": 3}, "non-empty list"),
        ({"history": "1,2", "top_k": 3}, "non-empty list"),
        ({"history": [1, "x"], "top_k": 3}, "entry 2: expected a product id"),
        ({"history": [{"product": 1}], "top_k": 3}, "unknown field 'product'"),
        ({"history": [{"product_id": 1.5}], "top_k": 3}, "product_id must be an integer"),
        ({"history": [{"product_id": 1, "event_type": "like"}], "top_k": 3}, "'like' unknown"),
        ({"history": [{"product_id": 1, "event_time": "yesterday"}], "top_k": 3}, "not a time"),
        (
            {"history": [{"product_id": 1, "event_time": 5}, {"product_id": 2}], "top_k": 3},
            "on every event or on none",
        ),
        ({"history": [[1], []], "top_k": 3}, "history 2 is empty"),
        ({"history": [1, 2]}, 'needs "top_k"'),
        ({"history": [[1], [2]], "top_k": 3, "exclude": [[1]]}, "1 lists for 2 users"),
    ],
)
def test_bad_history_is_a_400_with_the_reason(server, doc, words) -> None:
    r = server.post("/invocations", json.dumps(doc), "application/json")
    assert r.status_code == 400
    assert words in r.text and r.text.count("\n") == 1


def test_top_k_from_csv_and_custom_attributes(server, recommender) -> None:
    user = int(USER_IDS[4])
    attrs = {"X-Amzn-SageMaker-Custom-Attributes": "top_k=4"}
    r = server.post("/invocations", f"{user}\nnope\n", "text/csv", **attrs)
    assert r.status_code == 200
    lines = r.text.split("\n")
    assert lines[0].split(" ") == [str(i) for i in recommender.top_k(user, 4)[0]]
    assert lines[1:] == ["", ""]


@pytest.mark.parametrize(
    ("policy", "kind"), [("mean", "mean"), ("popularity", "popularity"), ("null", None)]
)
def test_fallback_policy_from_custom_attributes(server, recommender, policy, kind) -> None:
    product = int(PRODUCT_IDS[42])
    attrs = {"X-Amzn-SageMaker-Custom-Attributes": f"fallback={policy}"}
    r = server.post("/invocations", f"1,{product}\nbad,{product}\n", **attrs)
    got = csv_values(r.content)
    want = {
        "mean": GLOBAL_MEAN,
        "popularity": float(recommender.item_popularity[42]),
        None: None,
    }[kind]
    assert_scores(got, [want, None])  # malformed rows never fall back
    assert r.headers["X-Recsql-Fallback-Rows"] == ("0" if kind is None else "1")


@pytest.mark.parametrize(
    ("accept", "content_type", "want"),
    [
        (None, "text/csv", "text/csv"),  # answer in the request's type when not told
        ("*/*", "text/csv", "text/csv"),
        ("application/json", "text/csv", "application/json"),
        ("application/xml;q=0.9, application/jsonlines", "text/csv", "application/jsonlines"),
        ("text/*", "application/json", "text/csv"),
        (None, "application/x-npy", "application/json"),
    ],
)
def test_accept_negotiation(server, accept, content_type, want) -> None:
    pairs = np.array([[USER_IDS[0], PRODUCT_IDS[0]]])
    if content_type == "application/x-npy":
        buf = io.BytesIO()
        np.save(buf, pairs)
        body = buf.getvalue()
    elif content_type == "application/json":
        body = json.dumps({"instances": pairs.tolist()})
    else:
        body = f"{pairs[0, 0]},{pairs[0, 1]}\n"
    headers = {} if accept is None else {"Accept": accept}
    r = server.post("/invocations", body, content_type, **headers)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == want


@pytest.mark.parametrize(
    ("content_type", "body", "headers", "status", "words"),
    [
        ("text/plain", "1,2\n", {}, 415, "text/csv"),
        (None, "1,2\n", {}, 415, "Content-Type"),
        ("text/csv", "1,2\n", {"Accept": "application/xml"}, 406, "application/xml"),
        ("application/json", "{nope", {}, 400, "JSON"),
        ("application/json", '{"user_id": [1]}', {}, 400, "product_id"),
        ("application/json", '{"user_id": [1, 2], "product_id": [1]}', {}, 400, "lengths"),
        ("application/json", '{"user_id": [1], "top_k": 0}', {}, 400, "top_k"),
        ("application/json", '{"user_id": [1], "top_k": -Infinity}', {}, 400, "top_k"),
        ("application/json", '{"user_id": 1, "top_k": 2, "exclude": [1e400]}', {}, 400, "integer"),
        (
            "application/json",
            '{"user_id": 1, "top_k": 2, "exclude": [99999999999999999999]}',
            {},
            400,
            "64 bits",
        ),
        ("text/csv", "1,2\n", {"X-Amzn-SageMaker-Custom-Attributes": "fallback=x"}, 400, "null"),
        ("application/x-npy", "not npy", {}, 400, "npy"),
    ],
)
def test_errors_are_one_line(server, content_type, body, headers, status, words) -> None:
    r = server.post("/invocations", body, content_type, **headers)
    assert r.status_code == status
    assert r.text.endswith("\n") and r.text.count("\n") == 1
    assert words in r.text


def test_unknown_route_and_method(server) -> None:
    assert server.get("/nope").status_code == 404
    assert server.get("/invocations").status_code == 405


def test_execution_parameters(server) -> None:
    r = server.get("/execution-parameters")
    assert r.json() == {
        "MaxConcurrentTransforms": 2,
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": 6,
    }


_CONTENT_TYPES = ["text/csv", "application/json", "application/jsonlines", "application/x-npy"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.sampled_from(["1", "10007", "500003", ",", "\n", "\r\n", '"', "-", " ", "x", "é"]),
            max_size=60,
        ).map(lambda parts: "".join(parts).encode()),
    ),
    content_type=st.sampled_from(_CONTENT_TYPES),
)
def test_any_bytes_never_5xx(server, body: bytes, content_type: str) -> None:
    r = server.post("/invocations", body, content_type)
    assert r.status_code < 500, r.text
    if content_type == "text/csv":
        assert r.status_code == 200
        assert len(split_records(r.content)) == len(split_records(body))
