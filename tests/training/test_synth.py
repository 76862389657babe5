"""The synthetic event generator: exact format, determinism, marginals, planted sessions,
re-buys and drift, and the oracle that knows the generator's law."""

from __future__ import annotations

import argparse
import gzip
import re
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from model.errors import DataError
from training import cli
from training.events import prepare_events
from training.synth import HEADER, Oracle, SynthConfig, planted_groups, write_synthetic

ROWS = 200_000
TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC$")
DAY = 86400


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> tuple[Path, SynthConfig]:
    cfg = SynthConfig(rows=ROWS, seed=1)
    path = tmp_path_factory.mktemp("synth") / "events.csv"
    write_synthetic(path, cfg, progress=False)
    return path, cfg


def columns(path: Path) -> dict[str, np.ndarray]:
    con = duckdb.connect()
    rel = con.read_csv(str(path), header=True, all_varchar=True)
    return {name: np.array(values, dtype=object) for name, values in rel.fetchnumpy().items()}


@pytest.fixture(scope="module")
def log(events) -> dict[str, np.ndarray]:
    """The events as typed arrays in file order: user, product, epoch second, type, session."""
    path, _ = events
    sql = f"""SELECT user_id::BIGINT, product_id::BIGINT,
                     epoch(strptime(event_time, '%Y-%m-%d %H:%M:%S UTC'))::BIGINT, event_type,
                     user_session
              FROM read_csv('{path}', all_varchar=true)"""
    values = duckdb.connect().sql(sql).fetchnumpy().values()
    names = ("user", "product", "t", "type", "session")
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def test_header_rows_and_time_format(events):
    path, _ = events
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    assert len(lines) == ROWS + 1
    times = [line.split(",", 1)[0] for line in lines[1:]]
    assert all(TIME.match(t) for t in times[:1000] + times[-1000:])
    assert times == sorted(times)  # non-decreasing through the file
    assert times[0].startswith("2019-10-01") and times[-1].startswith("2019-11-30")
    assert all(len(line.split(",")) == 9 for line in lines[1:2000])


def test_deterministic_and_independent_of_file_split(tmp_path):
    cfg = SynthConfig(rows=30_000, seed=7)
    one = write_synthetic(tmp_path / "a.csv", cfg, progress=False)
    write_synthetic(tmp_path / "b.csv", cfg, progress=False)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert one["rows"] == 30_000
    write_synthetic(tmp_path / "c.csv", SynthConfig(rows=30_000, seed=8), progress=False)
    assert (tmp_path / "c.csv").read_bytes() != (tmp_path / "a.csv").read_bytes()
    split = write_synthetic(tmp_path / "parts", cfg, files=3, gzip=True, progress=False)
    assert [Path(f).name for f in split["files"]] == [f"events-00{i}.csv.gz" for i in range(3)]
    bodies = [gzip.decompress(Path(f).read_bytes()).decode().split("\n", 1) for f in split["files"]]
    assert all(head == HEADER for head, _ in bodies)
    assert "".join(body for _, body in bodies) == (tmp_path / "a.csv").read_text().split("\n", 1)[1]


def test_marginals(events):
    path, _ = events
    cols = columns(path)
    kinds, counts = np.unique(cols["event_type"].astype(str), return_counts=True)
    share = dict(zip(kinds.tolist(), (counts / ROWS).tolist(), strict=True))
    assert set(share) == {"view", "cart", "purchase"}
    assert share["view"] == pytest.approx(0.949, abs=0.006)
    assert share["cart"] == pytest.approx(0.036, abs=0.006)
    assert share["purchase"] == pytest.approx(0.015, abs=0.003)
    empty_code = np.mean([v is None for v in cols["category_code"]])
    empty_brand = np.mean([v is None for v in cols["brand"]])
    assert 0.1 < empty_code < 0.6 and 0.05 < empty_brand < 0.4
    # Heavy tails: the top 1% of users make > 15% of events, the top 10% of products > 40%.
    for key, top, least in (("user_id", 0.01, 0.15), ("product_id", 0.10, 0.40)):
        n = np.sort(np.unique(cols[key].astype(np.int64), return_counts=True)[1])[::-1]
        assert n[: max(1, int(len(n) * top))].sum() / n.sum() > least, key
    # Cart rows repeated at one timestamp.
    key = np.char.add(np.char.add(cols["event_time"].astype(str), cols["user_id"].astype(str)),
                      cols["product_id"].astype(str))  # fmt: skip
    cart = cols["event_type"] == "cart"
    _, repeats = np.unique(key[cart], return_counts=True)
    assert (repeats > 1).sum() > 50 and repeats.max() >= 4


def test_default_sizes_scale_with_rows():
    small, big = SynthConfig(rows=1_000_000).resolved(), SynthConfig(rows=55_000_000).resolved()
    assert big.users == 55_000_000 // 16 and 140_000 <= big.products <= 180_000
    assert small.users < big.users and small.products < big.products
    assert 2 <= small.groups <= big.groups <= 64


def test_planted_groups_and_learnable_structure(events):
    path, cfg = events
    cols = columns(path)
    groups = planted_groups(cfg)
    user_group = dict(zip(groups["user_ids"].tolist(), groups["user_group"].tolist(), strict=True))
    product_group = dict(
        zip(groups["product_ids"].tolist(), groups["product_group"].tolist(), strict=True)
    )
    buys = cols["event_type"] == "purchase"
    same = [
        user_group[int(u)] == product_group[int(p)]
        for u, p in zip(cols["user_id"][buys], cols["product_id"][buys], strict=True)
    ]
    # ~0.76 planted: a third are re-buys of primary-group staples, the rest come from browse
    # sessions whose interest is the primary group 70% of the time (85% of their products).
    assert 0.65 < np.mean(same) < 0.85

    # Black box: on the prepared split, an item co-occurrence ranking beats popularity on HR@10.
    p = prepare_events([path], progress=False, threads=1).without_test_pairs()
    seen = np.zeros((len(p.user_ids), len(p.product_ids)), np.float32)
    np.add.at(seen, (p.train_users, p.train_items), 1.0)
    together = seen.T @ seen
    np.fill_diagonal(together, 0.0)

    def hit_rate(scores: np.ndarray) -> float:
        top = np.argsort(-scores[p.test_users], axis=1, kind="stable")[:, :10]
        return float(np.mean((top == p.test_items[:, None]).any(axis=1)))

    popularity = np.broadcast_to(seen.sum(axis=0), seen.shape)
    assert hit_rate(seen @ together) > hit_rate(popularity) + 0.1


def test_sessions_repeats_and_rebuys(log):
    user, product, t, kind, session = (log[k] for k in ("user", "product", "t", "type", "session"))
    by_user = np.lexsort((np.arange(len(user)), user))  # each user's events, oldest first
    u, p = user[by_user], product[by_user]
    # (a) The next event names a product of the user's previous 5 events far more than chance.
    known = np.r_[np.zeros(5, bool), u[5:] == u[:-5]]
    shuffled = p.copy()
    shuffled[known] = np.random.default_rng(0).permutation(p[known])
    recent = np.stack([np.r_[np.full(k, -1), p[:-k]] for k in range(1, 6)])
    assert (recent == p)[:, known].any(axis=0).mean() > 0.5  # ~0.75 planted
    assert (recent == shuffled)[:, known].any(axis=0).mean() < 0.05
    # (b) Users buy the same product again in another session.
    _, sid = np.unique(session, return_inverse=True)
    _, code = np.unique(product, return_inverse=True)
    bought = kind == "purchase"
    purchases = np.unique(np.c_[user[bought], code[bought], sid[bought]], axis=0)
    _, sessions_per_pair = np.unique(purchases[:, :2], axis=0, return_counts=True)
    assert (sessions_per_pair > 1).sum() >= 20
    # (c) A session is one user's, on one day, its events at most 5 minutes apart; in it a cart
    # follows a view of its product and a purchase follows a cart of it.
    assert len(np.unique(np.c_[sid, user], axis=0)) == sid.max() + 1
    assert len(np.unique(np.c_[sid, t // DAY], axis=0)) == sid.max() + 1
    order = np.lexsort((np.arange(len(sid)), sid))  # each session's events in file order
    s, key, st, sk = sid[order], sid[order] * (code.max() + 1) + code[order], t[order], kind[order]
    steps = np.diff(st)[s[1:] == s[:-1]]
    assert steps.min() >= 0 and steps.max() <= 300
    for later, earlier in (("cart", "view"), ("purchase", "cart")):
        keys, first = np.unique(key[sk == earlier], return_index=True)
        first = np.flatnonzero(sk == earlier)[first]
        rows = np.flatnonzero(sk == later)
        at = np.minimum(np.searchsorted(keys, key[rows]), len(keys) - 1)
        assert len(rows) > 1000 and np.all((keys[at] == key[rows]) & (first[at] < rows))
    # (d) Event type shares within a point of the targets.
    shares = [np.mean(kind == name) for name in ("view", "cart", "purchase")]
    assert np.allclose(shares, [0.949, 0.036, 0.015], atol=0.01)


def test_interests_drift(log, events):
    """Sessions away from the primary group agree on their group when days apart, not weeks."""
    _, cfg = events
    groups = planted_groups(cfg)
    user_group = dict(zip(groups["user_ids"].tolist(), groups["user_group"].tolist(), strict=True))
    product_group = dict(
        zip(groups["product_ids"].tolist(), groups["product_group"].tolist(), strict=True)
    )
    views = log["type"] == "view"
    _, sid = np.unique(log["session"][views], return_inverse=True)
    group = np.array([product_group[p] for p in log["product"][views].tolist()])
    counts = np.zeros((sid.max() + 1, cfg.resolved().groups))
    np.add.at(counts, (sid, group), 1)
    start = np.full(len(counts), np.iinfo(np.int64).max)
    np.minimum.at(start, sid, log["t"][views])
    owner = np.zeros(len(counts), np.int64)
    owner[sid] = log["user"][views]
    main = counts.argmax(axis=1)  # a session's interest group, by its views
    away = np.flatnonzero(main != np.array([user_group[u] for u in owner.tolist()]))
    away = away[np.lexsort((start[away], owner[away]))]
    same_user = owner[away][1:] == owner[away][:-1]
    apart = np.diff(start[away])[same_user]
    agree = (main[away][1:] == main[away][:-1])[same_user]
    close, far = agree[apart < 2 * DAY], agree[apart > 15 * DAY]  # drift_days is 14
    assert len(close) > 500 and len(far) > 200
    assert close.mean() > far.mean() + 0.2  # ~0.5 vs ~0.1 planted


def test_oracle_beats_popularity_and_is_calibrated(log, events):
    """Each user's last event, from their earlier ones: the oracle ranks it far better than
    popularity, and its probabilities are the generator's (E[p(actual)] = E[sum p^2])."""
    _, cfg = events
    users, row = np.unique(log["user"], return_inverse=True)
    last = np.zeros(len(users), np.int64)
    last[row] = np.arange(len(row))  # the last occurrence wins
    earlier = np.ones(len(row), bool)
    earlier[last] = False
    oracle = Oracle(cfg)
    target = oracle.columns(log["product"][last])
    history = (row[earlier], log["product"][earlier], log["t"][earlier], log["type"][earlier])
    probs = oracle.scores(users, log["t"][last], *history)
    assert probs.shape == (len(users), len(oracle.product_ids))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :10]
    oracle_hr = np.mean((top == target[:, None]).any(axis=1))
    counts = np.bincount(oracle.columns(log["product"][earlier]), minlength=probs.shape[1])
    popularity_hr = np.isin(target, np.argsort(-counts, kind="stable")[:10]).mean()
    assert oracle_hr > popularity_hr + 0.4  # ~0.87 vs ~0.24
    assert popularity_hr > 10 / probs.shape[1]
    actual = probs[np.arange(len(users)), target].astype(np.float64)
    expected = (probs.astype(np.float64) ** 2).sum(axis=1)  # if the probabilities are right
    assert actual.mean() == pytest.approx(expected.mean(), abs=0.02)


def test_oracle_scores_10k_users_on_3k_products_quickly():
    cfg = SynthConfig(rows=1_000_000, seed=3)
    oracle = Oracle(cfg)
    rng = np.random.default_rng(0)
    users = rng.choice(planted_groups(cfg)["user_ids"], 10_000, replace=False)
    rows = np.repeat(np.arange(10_000), 6)  # 6 events each, a minute apart, then a minute on
    times = (
        1_570_000_000
        + rng.integers(0, 40 * DAY, 10_000).repeat(6)
        + np.tile(np.arange(6) * 60, 10_000)
    )
    types = rng.choice(["view", "cart", "purchase"], len(rows), p=[0.9, 0.07, 0.03])
    products = rng.choice(oracle.product_ids, len(rows))
    started = time.perf_counter()
    probs = oracle.scores(users, times[5::6] + 60, rows, products, times, types)
    assert time.perf_counter() - started < 60
    assert probs.shape == (10_000, len(oracle.product_ids)) and len(oracle.product_ids) > 2800
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_time_never_goes_back_across_chunks(tmp_path, monkeypatch):
    import training.synth as synth

    monkeypatch.setattr(synth, "_SESSIONS", 500)  # ~2,600 rows a chunk: a dozen boundaries
    write_synthetic(tmp_path / "e.csv", SynthConfig(rows=30_000, seed=2), progress=False)
    cols = columns(tmp_path / "e.csv")
    times = cols["event_time"].astype(str)
    assert len(times) == 30_000 and np.all(times[1:] >= times[:-1])
    assert times[0].startswith("2019-10-01") and times[-1].startswith("2019-11-30")
    days = np.char.partition(times, " ")[:, 0]
    assert len(np.unique(np.c_[cols["user_session"].astype(str), days], axis=0)) == len(
        np.unique(cols["user_session"])
    )


def test_cli_writes_gzip_readable_by_prepare(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli._add_synth(parser.add_subparsers())
    out = tmp_path / "e.csv.gz"
    args = parser.parse_args(["synth", "--rows", "20000", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    assert "wrote 20,000 rows" in capsys.readouterr().out
    prepared = prepare_events([out], progress=False, threads=1)
    assert prepared.stats["events_read"] == 20_000
    assert len(prepared.test_users) == len(prepared.user_ids) > 100


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="--rows must be positive"):
        write_synthetic(tmp_path / "x.csv", SynthConfig(rows=0), progress=False)
    with pytest.raises(DataError, match="needs a folder"):
        write_synthetic(tmp_path / "x.csv", SynthConfig(rows=10), files=2, progress=False)
    with pytest.raises(DataError, match="rebuy_share 0.5 is too high"):
        write_synthetic(tmp_path / "x.csv", SynthConfig(rows=10, rebuy_share=0.5), progress=False)
    with pytest.raises(DataError, match="repeat_view must be within"):
        write_synthetic(tmp_path / "x.csv", SynthConfig(rows=10, repeat_view=2), progress=False)
    with pytest.raises(DataError, match="user_id 3 is not in"):
        Oracle(SynthConfig(rows=1000)).scores([3], [0], [], [], [], [])


def test_output_appears_only_when_complete(tmp_path, monkeypatch):
    import training.synth as synth

    out = tmp_path / "events.csv"
    seen_while_writing = []
    real_copy = synth.shutil.copyfileobj

    def copy(src, sink, size):
        seen_while_writing.append(out.exists())
        real_copy(src, sink, size)

    monkeypatch.setattr(synth.shutil, "copyfileobj", copy)
    synth.write_synthetic(out, synth.SynthConfig(rows=5000, seed=1), progress=False)
    assert seen_while_writing and not any(seen_while_writing)
    assert len(out.read_text().splitlines()) == 5001
    assert [p.name for p in tmp_path.iterdir()] == ["events.csv"]  # no partial file left
