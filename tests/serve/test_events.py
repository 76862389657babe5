"""Fresh events (serve/events.py): taken all or nothing, read at the next score or top-K of
that user in every worker, on both stores (SQLite under the state dir; a real Redis at
RECSQL_TEST_REDIS_URL, default redis://127.0.0.1:6379/0, one key prefix per test)."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import load_model
from model.errors import BadRequest, RecsqlError
from serve import Invocation, build_dataplane, from_env
from serve.events import EVENT, EventStoreUnavailable, FreshEvents, open_store, parse_events

from .conftest import (
    PRODUCT_IDS,
    USER_IDS,
    make_artifact,
    running,
)
from .test_history import stored_events

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
LATER = 1_900_000_000  # after every event of the test artifacts


def redis_url() -> str:
    import redis

    url = os.environ.get("RECSQL_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:
        message = f"no Redis at {url}: {exc}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{message} (CI=true: the Redis tests must run)", pytrace=False)
        pytest.skip(f"{message}; `apt-get install redis-server` or set RECSQL_TEST_REDIS_URL")
    return url


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The event settings of one backend: url and a key prefix of this test's own."""
    if request.param == "sqlite":
        yield {"events_url": f"sqlite://{tmp_path / 'events.sqlite'}"}
        return
    import redis

    url, prefix = redis_url(), f"recsql-test:{uuid.uuid4().hex}:"
    yield {"events_url": url, "events_prefix": prefix}
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("embedding") / "model")


def dataplane(model_dir: Path, tmp: Path, **settings):
    return build_dataplane(from_env({}, model_dir=model_dir, state_dir=tmp, **settings))


def call(plane, doc) -> dict:
    reply = plane.invoke(Invocation(json.dumps(doc).encode(), "application/json"))
    return json.loads(reply.body)


def event(user: int, product: int, kind: str = "view", at: int | None = None, who="user_id"):
    out = {who: user, "product_id": product, "event_type": kind}
    return out if at is None else {**out, "event_time": at}


# ---------------------------------------------------------------- parsing


def test_parse_keeps_request_order_and_defaults_to_a_view_now() -> None:
    batch = parse_events(
        [
            {"user_id": 7, "product_id": 1, "event_type": "cart", "event_time": 1572688800},
            {"session_id": -3, "product_id": 2},
            {"user_id": 7, "product_id": 3, "event_time": "2019-11-02 10:00:00 UTC"},
        ],
        now=1_700_000_000,
    )
    assert batch.user_ids.tolist() == [7, -3, 7]
    assert batch.events["product_id"].tolist() == [1, 2, 3]
    assert batch.events["event_type"].tolist() == [1, 0, 0]
    assert batch.events["event_time"].tolist() == [1572688800, 1_700_000_000, 1572688800]
    assert EVENT.itemsize == 17
    by_user = batch.by_user()
    assert [len(v) // 17 for v in by_user.values()] == [1, 2]


def test_every_bad_entry_is_named_with_its_reason() -> None:
    with pytest.raises(BadRequest) as error:
        parse_events(
            [
                {"user_id": 1, "product_id": 2},
                {"user_id": 1, "product_id": "x"},
                {"product_id": 3},
                {"user_id": 1, "session_id": 2, "product_id": 3},
                {"user_id": True, "product_id": 3},
                {"user_id": 1, "product_id": 3, "event_type": "zap"},
                {"user_id": 1, "product_id": 3, "event_time": "yesterday"},
                {"user_id": 1, "product_id": 3, "price": 4},
                5,
            ],
            now=0,
        )
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("events: nothing taken, 8 of 9 entries rejected: entry 2:")
    for n in range(2, 10):
        assert f"entry {n}:" in message
    assert "'zap' unknown" in message and "'price'" in message and "'yesterday'" in message
    for bad in (None, [], {"user_id": 1}):
        with pytest.raises(BadRequest):
            parse_events(bad, now=0)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "user_id": _JSON | st.integers(),
        "session_id": _JSON,
        "product_id": _JSON | st.integers(),
        "event_type": _JSON | st.sampled_from(["view", "cart", "purchase"]),
        "event_time": _JSON | st.integers(),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_JSON | st.lists(_ENTRY | _JSON, max_size=5))
def test_any_events_value_is_taken_or_refused_never_a_500(history_dir, value) -> None:
    plane = _in_memory_plane(history_dir)
    body = json.dumps({"events": value}).encode()
    try:
        reply = plane.invoke(Invocation(body, "application/json"))
    except RecsqlError as exc:
        assert exc.status == 400 and "\n" not in str(exc)
    else:
        taken = json.loads(reply.body)
        assert reply.status == 200 and taken["taken"] == len(value)


_PLANES: dict[Path, object] = {}


def _in_memory_plane(model_dir: Path):
    if model_dir not in _PLANES:  # SQLite in memory: no state dir
        _PLANES[model_dir] = build_dataplane(from_env({}, model_dir=model_dir))
    return _PLANES[model_dir]


# ---------------------------------------------------------------- scores move


def test_known_user_reads_artifact_events_plus_fresh_ones(history_dir, tmp_path, store) -> None:
    """A known user's top-K and pair scores after fresh events are those of their events as
    of training followed by the fresh ones, sent as a history: to the float."""
    plane = dataplane(history_dir, tmp_path, **store)
    rec = load_model(history_dir)
    user, row = int(USER_IDS[5]), 5
    fresh = [
        event(user, int(PRODUCT_IDS[450]), "cart", LATER),
        event(user, int(PRODUCT_IDS[451]), "purchase", LATER + 60),
        event(user, 1, "view", LATER + 90),  # a product the model does not know
    ]
    before = call(plane, {"user_id": [user], "top_k": 10})["predictions"][0]
    assert call(plane, {"events": fresh}) == {"taken": 3, "users": 1}
    after = call(plane, {"user_id": [user], "top_k": 10})["predictions"][0]
    history = stored_events(history_dir, rec, row) + [
        {k: v for k, v in e.items() if k != "user_id"} for e in fresh
    ]
    expected = call(plane, {"history": history, "top_k": 10})["predictions"][0]
    assert after["product_ids"] != before["product_ids"]
    assert after["product_ids"] == expected["product_ids"]
    np.testing.assert_allclose(after["scores"], expected["scores"], rtol=1e-5)
    pairs = call(plane, {"user_id": [user] * 3, "product_id": expected["product_ids"][:3]})
    np.testing.assert_allclose(pairs["predictions"], expected["scores"][:3], rtol=1e-5)
    other = int(USER_IDS[6])  # no fresh events: as the artifact says
    assert call(plane, {"user_id": [other], "product_id": [int(PRODUCT_IDS[0])]}) == call(
        dataplane(history_dir, tmp_path / "off", events_url="off"),
        {"user_id": [other], "product_id": [int(PRODUCT_IDS[0])]},
    )


def test_visitor_is_ranked_from_their_session_events(history_dir, tmp_path, store) -> None:
    plane = dataplane(history_dir, tmp_path, **store)
    session = -424242
    assert call(plane, {"user_id": [session], "top_k": 5})["predictions"][0]["product_ids"] == []
    fresh = [event(session, int(PRODUCT_IDS[p]), "view", LATER + p, "session_id") for p in (3, 9)]
    call(plane, {"events": fresh})
    got = call(plane, {"user_id": [session], "top_k": 5})["predictions"][0]
    history = [{k: v for k, v in e.items() if k != "session_id"} for e in fresh]
    expected = call(plane, {"history": history, "top_k": 5})["predictions"][0]
    assert got["product_ids"] == expected["product_ids"]
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-5)
    # CSV pairs, as SQL sends them: the session id is the user id
    reply = plane.invoke(
        Invocation(f"{session},{expected['product_ids'][0]}\n".encode(), "text/csv")
    )
    assert float(reply.body) == pytest.approx(expected["scores"][0], rel=1e-5)


def test_embedding_model_folds_in_visitors_and_keeps_known_users(
    embedding_dir, tmp_path, store
) -> None:
    """Models with a per-user embedding: an unknown id is folded in from its events; a known
    user's trained row does not move (documented in the README)."""
    plane = dataplane(embedding_dir, tmp_path, **store)
    known, visitor, products = int(USER_IDS[2]), -9, [int(p) for p in PRODUCT_IDS[:4]]
    before = call(plane, {"user_id": [known], "top_k": 5})
    call(plane, {"events": [event(known, p) for p in products] + [event(visitor, products[0])]})
    assert call(plane, {"user_id": [known], "top_k": 5}) == before
    got = call(plane, {"user_id": [visitor], "top_k": 5})["predictions"][0]
    expected = call(plane, {"history": products[:1], "top_k": 5})["predictions"][0]
    assert got["product_ids"] == expected["product_ids"]


def test_last_n_per_user_and_the_ttl(history_dir, tmp_path, store) -> None:
    plane = dataplane(history_dir, tmp_path, events_keep=5, events_ttl=1, **store)
    user = -77
    call(plane, {"events": [event(user, int(PRODUCT_IDS[p]), at=LATER + p) for p in range(8)]})
    kept = plane.events.lookup(np.array([user]))[user]
    assert kept["product_id"].tolist() == [int(p) for p in PRODUCT_IDS[3:8]]
    time.sleep(2.1)  # Redis expires within 1 s of the TTL; SQLite exactly at it
    assert plane.events.lookup(np.array([user])) == {}


def test_nothing_is_taken_from_a_request_with_a_bad_entry(history_dir, tmp_path, store) -> None:
    plane = dataplane(history_dir, tmp_path, **store)
    good = event(-5, int(PRODUCT_IDS[0]))
    with pytest.raises(BadRequest, match="entry 2: product_id"):
        call(plane, {"events": [good, {"user_id": -5, "product_id": None}]})
    assert plane.events.lookup(np.array([-5])) == {}
    with pytest.raises(BadRequest, match='send "events" alone'):
        call(plane, {"events": [good], "top_k": 3})
    assert plane.events.lookup(np.array([-5])) == {}


# ---------------------------------------------------------------- a dead Redis


def test_dead_redis_503s_events_and_scoring_goes_on(history_dir, tmp_path) -> None:
    plane = dataplane(history_dir, tmp_path, events_url=DEAD_REDIS_URL)
    with pytest.raises(EventStoreUnavailable) as error:
        call(plane, {"events": [event(1, int(PRODUCT_IDS[0]))]})
    assert error.value.status == 503 and "\n" not in str(error.value)
    assert "unavailable" in str(error.value) and "127.0.0.1:1" in str(error.value)
    user = int(USER_IDS[1])
    off = dataplane(history_dir, tmp_path / "off", events_url="off")
    started = time.perf_counter()
    for _ in range(20):
        assert call(plane, {"user_id": [user], "top_k": 3}) == call(
            off, {"user_id": [user], "top_k": 3}
        )
    assert time.perf_counter() - started < 2  # no connect timeout paid per request


def test_unreachable_redis_costs_one_short_timeout() -> None:
    """A host that never answers (a blackholed address): the lookup gives up after the
    connect timeout, and the next lookups within RECHECK_SECONDS do not try."""
    events = FreshEvents("redis://10.255.255.1:6379/0", 200, 60, "x:")
    started = time.perf_counter()
    assert events.lookup(np.array([1])) == {}
    first = time.perf_counter() - started
    started = time.perf_counter()
    assert events.lookup(np.array([1])) == {}
    assert first < 0.5 and time.perf_counter() - started < 0.01


# ---------------------------------------------------------------- a real 2-worker server


@pytest.mark.slow
def test_every_worker_sees_fresh_events_within_a_second(history_dir, tmp_path, store) -> None:
    env = {"RECSQL_EVENTS_URL": store["events_url"]}
    if "events_prefix" in store:
        env["RECSQL_EVENTS_PREFIX"] = store["events_prefix"]
    if store["events_url"].startswith("sqlite"):
        del env["RECSQL_EVENTS_URL"]  # the default: SQLite under the server's state dir
    args = ["--model-dir", str(history_dir), "--workers", "2"]
    with running(args, tmp_path, env) as server:
        session, query = -31337, {"user_id": [-31337], "top_k": 3}
        clients = [requests.Session() for _ in range(4)]  # kept alive: spread over workers
        for client in clients:
            r = client.post(server.url + "/invocations", json=query, timeout=10)
            assert r.json()["predictions"][0]["product_ids"] == []
        fresh = [event(session, int(PRODUCT_IDS[7]), "cart", who="session_id")]
        r = clients[0].post(server.url + "/invocations", json={"events": fresh}, timeout=10)
        assert r.status_code == 200 and r.json() == {"taken": 1, "users": 1}
        posted = time.monotonic()
        seen: dict[int, float] = {}
        while len(seen) < len(clients) and time.monotonic() - posted < 3:
            for n, client in enumerate(clients):
                r = client.post(server.url + "/invocations", json=query, timeout=10)
                if n not in seen and r.json()["predictions"][0]["product_ids"]:
                    seen[n] = time.monotonic() - posted
        assert len(seen) == len(clients) and max(seen.values()) < 1.0, seen
        r = clients[1].post(server.url + "/events", json={"events": fresh}, timeout=10)
        assert r.json() == {"taken": 1, "users": 1}
        r = clients[1].post(server.url + "/events", json={"user_id": [1]}, timeout=10)
        assert r.status_code == 400
        for client in clients:
            client.close()


@pytest.mark.slow
def test_server_with_redis_down_answers_503_and_scores(history_dir, tmp_path) -> None:
    args = ["--model-dir", str(history_dir), "--workers", "2"]
    with running(args, tmp_path, {"RECSQL_EVENTS_URL": DEAD_REDIS_URL}) as server:
        r = server.post("/invocations", json.dumps({"events": [event(1, 2)]}), "application/json")
        assert r.status_code == 503 and r.text.count("\n") == 1 and "unavailable" in r.text
        r = server.post("/invocations", f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n")
        assert r.status_code == 200 and float(r.text) > 0
        assert server.proc.poll() is None


def _append_many(url: str, first_user: int, requests: int, go) -> None:
    store = open_store(url, 200, 3600, "unused:")
    store.any()  # connected and set up before the others start writing
    go.wait(60)  # all start together
    for i in range(requests):
        batch = parse_events(
            [{"user_id": first_user + i % 20, "product_id": i, "event_time": i}], 0
        )
        store.append(batch)
    store.close()


def test_sqlite_writers_in_several_processes_wait_for_each_other(tmp_path) -> None:
    # No busy_timeout: the store waits for another worker's write lock itself, in short
    # sleeps. Three processes appending at once lose nothing and fail nothing.
    import multiprocessing

    url = f"sqlite://{tmp_path / 'events.sqlite'}"
    context = multiprocessing.get_context("spawn")
    go = context.Barrier(4)
    writers = [
        context.Process(target=_append_many, args=(url, 1000 * (w + 1), 2000, go)) for w in range(3)
    ]
    for writer in writers:
        writer.start()
    go.wait(60)
    for writer in writers:
        writer.join(120)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    store = open_store(url, 200, 3600, "unused:")
    found = store.recent([1000 * (w + 1) + u for w in range(3) for u in range(20)])
    assert len(found) == 60
    assert {len(data) // EVENT.itemsize for data in found.values()} == {100}  # 2000 / 20
    store.close()
