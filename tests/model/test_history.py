"""Recent events, the history tower's pooling, the repeat term and its per-pair lookup,
each against a plain loop over the events."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model import history
from model.history import (
    GAP_BUCKETS,
    GAP_EDGES,
    POSITION_EDGES,
    Bonus,
    HistoryTower,
    RecentEvents,
    RepeatTerm,
)


def random_events(seed: int, users: int = 30, items: int = 12, n: int = 400) -> RecentEvents:
    rng = np.random.default_rng(seed)
    user = np.sort(rng.integers(0, users, n))
    times = np.zeros(n, np.int64)
    for u in np.unique(user):  # each user's events oldest first, some at one second
        at = np.flatnonzero(user == u)
        steps = rng.choice([0, 60, 4000, 200_000, 9_000_000], len(at))
        times[at] = 1_570_000_000 + np.cumsum(steps)
    item = rng.integers(-1, items, n)  # -1: a product the model does not know
    kind = rng.integers(0, 4, n)
    return RecentEvents.build(user, item, kind, times, users)


def test_build_keeps_each_users_last_events_oldest_first():
    users = np.array([0, 0, 0, 2, 2])
    events = RecentEvents.build(users, np.arange(5), np.zeros(5), np.arange(5) * 10, 3, keep=2)
    assert events.indptr.tolist() == [0, 2, 2, 4]
    assert events.items.tolist() == [1, 2, 3, 4]
    assert events.from_end().tolist() == [1, 0, 1, 0]
    assert events.gaps().tolist() == [10, 0, 10, 0]
    picked = events.subset(np.array([2, 1, 0]))
    assert picked.indptr.tolist() == [0, 2, 2, 4] and picked.items.tolist() == [3, 4, 1, 2]


@pytest.mark.parametrize("small_pool", [0, 2048], ids=["sparse", "gathered"])
@pytest.mark.parametrize("seed", range(3))
def test_pooling_is_the_weighted_mean_of_the_last_events(seed, small_pool, monkeypatch):
    monkeypatch.setattr(history, "SMALL_POOL", small_pool)  # both ways of pooling
    events = random_events(seed)
    rng = np.random.default_rng(seed)
    tower = HistoryTower(rng.normal(size=5), rng.normal(size=4))
    emb = rng.normal(size=(12, 3)).astype(np.float32)
    got = tower.pooled(events, emb)
    for u in range(events.num_users):
        lo, hi = events.indptr[u], events.indptr[u + 1]
        total, acc = 0.0, np.zeros(3)
        for k, e in enumerate(range(hi - 1, lo - 1, -1)):  # k = 0: the latest
            if k >= 5 or events.items[e] < 0:
                continue
            w = math.exp(tower.position[k] + tower.event_type[events.types[e]])
            total += w
            acc += w * emb[events.items[e]]
        want = acc / total if total else acc
        np.testing.assert_allclose(got[u], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_bonus_follows_the_formula_and_lookup_finds_it(seed):
    events = random_events(seed)
    rng = np.random.default_rng(seed)
    repeat = RepeatTerm(
        0.7, rng.normal(size=(4, GAP_BUCKETS)), rng.normal(size=GAP_BUCKETS), rng.normal(size=5)
    )
    bonus = repeat.bonus(events)
    want: dict[tuple[int, int], float] = {}
    for u in range(events.num_users):
        lo, hi = events.indptr[u], events.indptr[u + 1]
        if hi == lo:
            continue
        latest = events.times[hi - 1]
        mass: dict[int, float] = {}
        last: dict[int, int] = {}  # the most recent event of each product
        for e in range(lo, hi):
            item = int(events.items[e])
            if item < 0:
                continue
            bucket = int(np.searchsorted(GAP_EDGES, latest - events.times[e], side="right"))
            mass[item] = mass.get(item, 0.0) + math.exp(repeat.weights[events.types[e], bucket])
            last[item] = e
        for item, m in mass.items():
            e = last[item]
            gap = int(np.searchsorted(GAP_EDGES, latest - events.times[e], side="right"))
            back = int(np.searchsorted(POSITION_EDGES, hi - 1 - e, side="right"))
            want[(u, item)] = (
                repeat.scale * math.log1p(m) + repeat.latest[gap] + repeat.recent[back]
            )
    assert len(bonus.items) == len(want)
    for u in range(events.num_users):
        items, values = bonus.row(u)
        assert list(items) == sorted(items)
        for item, value in zip(items.tolist(), values.tolist(), strict=True):
            assert value == pytest.approx(want[(u, item)], rel=1e-5, abs=1e-6)
    users = rng.integers(0, events.num_users, 2000)
    items = rng.integers(0, 12, 2000)
    expected = [want.get((u, i), 0.0) for u, i in zip(users.tolist(), items.tolist(), strict=True)]
    np.testing.assert_allclose(bonus.lookup(users, items), expected, rtol=1e-5, atol=1e-6)
    for n in (1, 7, 32):  # a few pairs take the one-bisect-each path: the same numbers
        np.testing.assert_array_equal(
            bonus.lookup(users[:n], items[:n]), bonus.lookup(users, items)[:n]
        )


def test_lookup_on_an_empty_bonus_is_zero():
    bonus = Bonus(np.zeros(4, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    assert bonus.lookup(np.array([0, 2]), np.array([5, 1])).tolist() == [0.0, 0.0]


def test_repeat_term_round_trips_and_rejects_bad_documents():
    term = RepeatTerm(
        -1.5, np.full((4, GAP_BUCKETS), 0.25), np.linspace(-1, 1, GAP_BUCKETS), np.ones(5)
    )
    back = RepeatTerm.from_json(term.to_json())
    assert back.scale == term.scale and np.allclose(back.weights, term.weights)
    bad = term.to_json()
    for change in (
        {"gap_edges": [1, 2]},
        {"weights": [[0.0]]},
        {"latest": [float("nan")] * GAP_BUCKETS},
        {"recent": [0.0]},
        {"position_edges": [1]},
        {"scale": "big"},
    ):
        with pytest.raises(ValueError):
            RepeatTerm.from_json({**bad, **change})
    with pytest.raises(ValueError):
        RepeatTerm.from_json(None)
