"""History models behind the server: typed history events, the repeat term in pairs and
top-K, and a user the model knows read the same way from the events a caller sends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from model import load_model
from model.errors import BadRequest
from model.history import TYPE_CODES
from serve.history import parse_histories

from .conftest import PRODUCT_IDS, USER_IDS, running


@pytest.fixture(scope="module")
def rec(history_dir):
    return load_model(history_dir)


@pytest.fixture(scope="module")
def server(history_dir, tmp_path_factory):
    with running(
        ["--model-dir", str(history_dir), "--workers", "1"], tmp_path_factory.mktemp("s")
    ) as srv:
        yield srv


def stored_events(history_dir: Path, rec, row: int) -> list[dict]:
    """A known user's events as the artifact keeps them, as a caller would send them."""
    w = load_file(str(history_dir / "weights.safetensors"))
    lo, hi = w["events.indptr"][row], w["events.indptr"][row + 1]
    names = {code: name for name, code in TYPE_CODES.items()}
    return [
        {
            "product_id": int(rec.items.ids_by_row[w["events.items"][e]]),
            "event_type": names[int(w["events.types"][e])],
            "event_time": int(w["events.times"][e]),
        }
        for e in range(lo, hi)
    ]


def test_parse_orders_by_time_and_reads_plain_ids_as_one_session():
    rows = {5: 0, 6: 1, 7: 2}

    def to_rows(ids):
        return np.array([rows.get(i, -1) for i in ids.tolist()], np.int32)

    events = parse_histories(
        [
            [
                {"product_id": 6, "event_type": "cart", "event_time": "2019-11-02 10:00:00 UTC"},
                {"product_id": 5, "event_time": "2019-11-01T09:00:00"},
                {"product_id": 9, "event_type": "purchase", "event_time": 1572700000},
            ],
            [7, 5, 7],
        ],
        to_rows,
        keep=None,
    )
    assert events.indptr.tolist() == [0, 3, 6]
    assert events.items.tolist() == [0, 1, -1, 2, 0, 2]  # by time; 9: unknown
    assert events.types.tolist()[:3] == [
        TYPE_CODES["view"],
        TYPE_CODES["cart"],
        TYPE_CODES["purchase"],
    ]
    assert events.times[:3].tolist() == [1572598800, 1572688800, 1572700000]
    assert set(events.gaps()[3:].tolist()) == {0}  # no times: one session, list order
    last_two = parse_histories([1, 2, 3, 4], to_rows, keep=2)
    assert len(last_two) == 2


@pytest.mark.parametrize(
    "value",
    [[], [{}], [{"product_id": True}], [{"product_id": 1, "event_time": float("nan")}], [None]],
)
def test_parse_rejects_bad_entries(value):
    with pytest.raises(BadRequest):
        parse_histories(value, lambda ids: np.zeros(len(ids), np.int32), keep=None)


def test_pairs_carry_the_repeat_term(rec):
    row = int(np.argmax(np.diff(rec.bonus.indptr)))
    touched, values = rec.bonus.row(row)
    user = np.full(len(touched), rec.users.ids_by_row[row])
    scores = rec.score(user, rec.items.ids_by_row[touched])
    u = rec.user_vectors[row]
    logits = rec.item_vectors[touched] @ u + values
    np.testing.assert_allclose(scores, np.exp(logits - rec.user_log_normalizer[row]), rtol=1e-5)
    every = rec.score(np.full(len(PRODUCT_IDS), USER_IDS[row]), PRODUCT_IDS)
    np.testing.assert_allclose(every.sum(), 1.0, rtol=1e-4)  # still a distribution


def test_a_known_users_events_sent_as_history_rank_as_the_user(server, rec, history_dir):
    for row in (3, 17, 42):
        events = stored_events(history_dir, rec, row)
        if not events:
            continue
        user = int(USER_IDS[row])
        known = server.post(
            "/invocations", json.dumps({"user_id": user, "top_k": 10}), "application/json"
        )
        sent = server.post(
            "/invocations", json.dumps({"history": events, "top_k": 10}), "application/json"
        )
        a, b = known.json()["predictions"][0], sent.json()["predictions"][0]
        assert b["ranked_by"] == "history"
        assert a["product_ids"] == b["product_ids"]
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-5)
        ids, scores = rec.top_k(user, 10)
        assert a["product_ids"] == ids.tolist()
        assert a["scores"] == pytest.approx(scores.tolist(), rel=1e-5)


def test_event_types_and_times_change_the_ranking(server):
    products = PRODUCT_IDS[:6].tolist()
    views = [
        {"product_id": p, "event_time": 1_570_000_000 + 60 * k} for k, p in enumerate(products)
    ]
    carts = [dict(e, event_type="purchase") for e in views]
    spread = [dict(e, event_time=1_570_000_000 + 9_000_000 * k) for k, e in enumerate(views)]
    replies = [
        server.post(
            "/invocations", json.dumps({"history": h, "top_k": 10}), "application/json"
        ).json()["predictions"][0]
        for h in (views, carts, spread)
    ]
    assert all(r["ranked_by"] == "history" for r in replies)
    assert replies[0]["scores"] != replies[1]["scores"]
    assert replies[0]["scores"] != replies[2]["scores"]
