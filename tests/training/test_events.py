"""Event preparation: the seed's semantics, checked exactly on small hand-made files."""

from __future__ import annotations

import argparse
import csv
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.errors import DataError
from training import cli
from training.events import PreparedEvents, is_prepared_dir, prepare_events

HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
)


def write_events(path: Path, rows: list[tuple], header: str = HEADER) -> Path:
    """rows: (second, event_type, product_id, user_id); ids may be '' (empty)."""
    lines = [header]
    for second, event_type, product, user in rows:
        stamp = f"2019-10-01 00:{second // 60:02d}:{second % 60:02d} UTC"
        lines.append(f"{stamp},{event_type},{product},2053013555631882655,,,1.50,{user},sess")
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def prepare(paths, **kwargs) -> PreparedEvents:
    return prepare_events([Path(p) for p in paths], progress=False, threads=1, **kwargs)


def triples(p: PreparedEvents, which: str) -> list[tuple[int, int, float]]:
    """(external user, external product, label) rows of the train or test set."""
    users = p.user_ids[getattr(p, f"{which}_users")]
    items = p.product_ids[getattr(p, f"{which}_items")]
    labels = getattr(p, f"{which}_labels")
    return list(zip(users.tolist(), items.tolist(), labels.tolist(), strict=True))


def test_weights_per_event_type(tmp_path):
    types = ["purchase", "cart", "remove_from_cart", "view", "something_else", "view"]
    rows = [(i, t, 100 + i % 2, 7) for i, t in enumerate(types)]
    rows += [(50, "view", 900, 7)]  # the last event: its pair is the test pair
    p = prepare([write_events(tmp_path / "e.csv", rows)], min_events=1)
    assert triples(p, "train") == [
        (7, 100, 4.0),
        (7, 101, 3.0),
        (7, 100, 2.0),
        (7, 101, 1.0),
        (7, 100, 1.0),
        (7, 101, 1.0),
    ]
    assert triples(p, "test") == [(7, 900, 1.0)]
    assert p.train_labels.dtype == np.float32 and p.train_users.dtype == np.int32


def test_min_events_filter_is_one_pass(tmp_path):
    # User 1 has 5 events, one of them on product 99, which has only 1 event. After the one
    # pass user 1 keeps 4 rows (< 5) and stays: a fixed-point filter would drop them.
    rows = [(i, "view", 10, 1) for i in range(4)] + [(4, "view", 99, 1)]
    rows += [(10 + i, "view", 10, 2) for i in range(5)]
    rows += [(20 + i, "view", 10 + i % 2, 3) for i in range(4)]  # user 3: only 4 events
    p = prepare([write_events(tmp_path / "e.csv", rows)])
    assert sorted(p.user_ids.tolist()) == [1, 2]
    assert p.product_ids.tolist() == [10]
    assert p.stats["rows_kept"] == 9
    assert p.stats["events_read"] == len(rows)


def test_index_order_count_descending_ties_by_id(tmp_path):
    # Users 30 and 20 tie at 6 events (30 comes first in the file), 40 has 12, 10 has 5.
    # Products 5 and 3 tie at 11 events (5 comes first), 8 has 7.
    events = {
        30: [5, 3, 5, 3, 5, 3],
        10: [5, 3, 5, 3, 8],
        40: [3, 5, 3, 5, 3, 5, 8, 8, 8, 8, 8, 8],
        20: [3, 5, 3, 5, 3, 5],
    }
    rows = [(0, "view", p, u) for u, products in events.items() for p in products]
    p = prepare([write_events(tmp_path / "e.csv", rows)])
    assert p.user_ids.tolist() == [40, 20, 30, 10]
    assert p.product_ids.tolist() == [3, 5, 8]


def test_last_event_ties_broken_by_file_order_across_files(tmp_path):
    first = write_events(
        tmp_path / "first.csv",
        [(i, "view", 1, 5) for i in range(4)]
        + [(30, "cart", 2, 5), (30, "view", 3, 5)]  # same second: line order decides
        + [(i, "view", 1, 6) for i in range(5)]
        + [(40, "view", 1, 6)],
    )
    second = write_events(
        tmp_path / "second.csv",
        [(40, "purchase", 2, 6), (10, "view", 3, 5)]  # user 6: tie with file one, later file wins
        + [(i, "view", 2, 9) for i in range(5)]
        + [(i, "view", 3, 9) for i in range(5)],
    )
    p = prepare([first, second])
    test = {u: (item, label) for u, item, label in triples(p, "test")}
    assert test[5] == (3, 1.0)  # 00:30 twice in first.csv: the later line
    assert test[6] == (2, 4.0)  # 00:40 in both files: second.csv comes later
    # Files given the other way round: the tie now goes to first.csv's rows.
    q = prepare([second, first])
    test = {u: (item, label) for u, item, label in triples(q, "test")}
    assert test[5] == (3, 1.0)
    assert test[6] == (1, 1.0)


def test_last_event_is_by_time_not_position(tmp_path):
    rows = [(50, "purchase", 1, 3)] + [(i, "view", 2, 3) for i in range(5)]
    rows += [(i, "view", 1, 4) for i in range(5)]
    p = prepare([write_events(tmp_path / "e.csv", rows)])
    test = {u: (item, label) for u, item, label in triples(p, "test")}
    assert test[3] == (1, 4.0)


def test_test_row_held_out_repeats_kept_and_the_seeds_set(tmp_path):
    rows = [(0, "view", 1, 8), (1, "cart", 1, 8), (2, "cart", 1, 8), (3, "view", 2, 8)]
    rows += [(4, "view", 2, 8), (5, "view", 3, 8), (9, "purchase", 1, 8)]
    rows += [(i, "view", p, 9) for i, p in enumerate([1, 1, 2, 2, 3, 3, 3])]
    p = prepare([write_events(tmp_path / "e.csv", rows)], min_events=1)
    train = triples(p, "train")  # only the test row itself leaves: repeats are what a
    assert [t for t in train if t[0] == 8] == [  # history model learns from
        (8, 1, 1.0),
        (8, 1, 3.0),
        (8, 1, 3.0),
        (8, 2, 1.0),
        (8, 2, 1.0),
        (8, 3, 1.0),
    ]
    assert [t[1] for t in train if t[0] == 9] == [1, 1, 2, 2, 3, 3]
    assert sorted(triples(p, "test")) == [(8, 1, 4.0), (9, 3, 1.0)]
    start = 1569888000  # 2019-10-01 00:00:00 UTC
    times = p.train_times[p.user_ids[p.train_users] == 8] - start
    assert times.tolist() == [0, 1, 2, 3, 4, 5]
    assert sorted((p.test_times - start).tolist()) == [6, 9]
    seed = triples(p.without_test_pairs(), "train")  # the seed's: no row of the test pair
    assert [t for t in seed if t[0] == 8] == [(8, 2, 1.0), (8, 2, 1.0), (8, 3, 1.0)]
    assert [t for t in seed if t[0] == 9] == [(9, 1, 1.0), (9, 1, 1.0), (9, 2, 1.0), (9, 2, 1.0)]


def test_empty_ids_counted_and_skipped(tmp_path):
    rows = [(i, "view", 1, 2) for i in range(5)]
    rows += [(10, "view", "", 2), (11, "purchase", 1, ""), (12, "cart", "", "")]
    p = prepare([write_events(tmp_path / "e.csv", rows)])
    assert p.stats["rows_skipped_empty_id"] == 3
    assert p.stats["events_read"] == 8
    assert p.stats["rows_kept"] == 5  # the empty-id rows count towards nobody's 5 events


def test_gzip_and_folders_sorted_by_name(tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    # b.csv.gz sorts after a.csv: their shared timestamp goes to b's row.
    write_events(folder / "b.csv.gz", [(9, "purchase", 2, 1)])
    write_events(folder / "a.csv", [(i, "view", 1, 1) for i in range(9)] + [(9, "view", 3, 1)])
    (folder / "notes.txt").write_text("not events")
    p = prepare([folder], min_events=1)
    assert p.stats["files"] == [str(folder / "a.csv"), str(folder / "b.csv.gz")]
    assert triples(p, "test") == [(1, 2, 4.0)]
    assert p.stats["events_read"] == 11


def test_crlf_quotes_and_column_order(tmp_path):
    path = tmp_path / "e.csv"
    lines = ["user_id,product_id,brand,event_type,event_time"]
    lines += [
        f'{3 + i % 2},{40 + i % 2},"acme, inc",view,2019-10-01 00:00:0{i} UTC' for i in range(10)
    ]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    p = prepare([path])
    assert p.stats["events_read"] == 10
    assert sorted(triples(p, "test")) == [(3, 40, 1.0), (4, 41, 1.0)]


def test_missing_column_names_file_and_column(tmp_path):
    path = write_events(
        tmp_path / "e.csv", [(0, "view", 1, 1)], header=HEADER.replace("user_id", "uid")
    )
    with pytest.raises(DataError, match=r"e\.csv: line 1: missing column\(s\) user_id"):
        prepare([path])


def test_non_numeric_id_names_file_line_and_column(tmp_path):
    path = write_events(tmp_path / "e.csv", [(0, "view", 1, 1), (1, "view", "x12", 1)])
    with pytest.raises(
        DataError, match=r'e\.csv: line 3, column product_id: "x12" is not an integer'
    ):
        prepare([path])


def test_bad_time_and_short_row(tmp_path):
    path = write_events(tmp_path / "e.csv", [(0, "view", 1, 1)])
    path.write_text(path.read_text() + "2019-13-01 00:00:00 UTC,view,1,2,,,1.0,1,s\n")
    with pytest.raises(
        DataError, match=r"e\.csv: line 3, column event_time: .* is not a time like"
    ):
        prepare([path])
    path.write_text(HEADER + "\n2019-10-01 00:00:00 UTC,view,1,2,,,1.0,1\n")
    with pytest.raises(
        DataError, match=r"e\.csv: line 2: expected 9 fields as in the header, found 8"
    ):
        prepare([path])


def test_unreadable_or_missing_files(tmp_path):
    bad_gz = tmp_path / "broken.csv.gz"
    bad_gz.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"broken\.csv\.gz: cannot read the file"):
        prepare([bad_gz])
    with pytest.raises(DataError, match=r"nothere\.csv: no such file or folder"):
        prepare([tmp_path / "nothere.csv"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: folder holds no \.csv or \.csv\.gz files"):
        prepare([empty])


def test_nothing_left_after_filter_is_an_error(tmp_path):
    path = write_events(tmp_path / "e.csv", [(i, "view", i, 1) for i in range(4)])
    with pytest.raises(DataError, match="no events left"):
        prepare([path])


def test_save_load_roundtrip_and_cli(tmp_path):
    rows = [(i, "view", 1 + i % 3, 1 + i % 4) for i in range(60)]
    events = write_events(tmp_path / "e.csv", rows)
    parser = argparse.ArgumentParser()
    cli._add_prepare(parser.add_subparsers())
    args = parser.parse_args(["prepare", str(events), "--out", str(tmp_path / "prep")])
    assert args.func(args) == 0
    out = tmp_path / "prep"
    assert is_prepared_dir(out) and not is_prepared_dir(tmp_path)
    loaded = PreparedEvents.load(out)
    direct = prepare([events])
    for name in ("train_users", "train_items", "train_labels", "test_users", "user_ids"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(direct, name))
        assert getattr(loaded, name).dtype == getattr(direct, name).dtype
    index = (out / "user_index.csv").read_text().splitlines()
    assert index[0] == "user_id,user" and index[1] == f"{direct.user_ids[0]},0"
    assert loaded.stats["events_read"] == 60


def test_load_refuses_pickled_arrays(tmp_path):
    rows = [(i, "view", 1 + i % 3, 1 + i % 4) for i in range(60)]
    out = tmp_path / "prep"
    prepare([write_events(tmp_path / "e.csv", rows)]).save(out)
    np.save(out / "train_users.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="train_users.npy: cannot read"):
        PreparedEvents.load(out)


# --- the whole semantics against a plain-Python reference, on random small inputs ---------


def reference(files: list[Path], min_events: int) -> dict:
    rows, skipped = [], 0
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", newline="") as f:
            for rec in csv.DictReader(f):
                if not rec["user_id"] or not rec["product_id"]:
                    skipped += 1
                    continue
                weight = {"purchase": 4, "cart": 3, "remove_from_cart": 2}.get(rec["event_type"], 1)
                rows.append(
                    (
                        rec["event_time"],
                        len(rows),
                        weight,
                        int(rec["user_id"]),
                        int(rec["product_id"]),
                    )
                )
    user_n, product_n = Counter(r[3] for r in rows), Counter(r[4] for r in rows)
    kept = [r for r in rows if user_n[r[3]] >= min_events and product_n[r[4]] >= min_events]
    kept_u, kept_p = Counter(r[3] for r in kept), Counter(r[4] for r in kept)
    last = {}
    for r in kept:
        if r[3] not in last or r[:2] > last[r[3]][:2]:
            last[r[3]] = r
    test_pairs = {(r[3], r[4]) for r in last.values()}
    every: dict[int, list] = {}
    for r in kept:
        if r is not last[r[3]]:
            every.setdefault(r[3], []).append(r)
    return {
        "all_train": every,
        "user_ids": sorted(kept_u, key=lambda u: (-kept_u[u], u)),
        "product_ids": sorted(kept_p, key=lambda p: (-kept_p[p], p)),
        "train": [(r[3], r[4], float(r[2])) for r in kept if (r[3], r[4]) not in test_pairs],
        "test": {u: (r[4], float(r[2])) for u, r in last.items()},
        "skipped": skipped,
        "read": len(rows) + skipped,
    }


event = st.tuples(
    st.integers(0, 8),  # few distinct seconds: many ties
    st.sampled_from(["view", "view", "cart", "purchase", "remove_from_cart", "other"]),
    st.one_of(st.integers(1, 6), st.just("")),
    st.one_of(st.integers(1, 9), st.just("")),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parts=st.lists(st.lists(event, max_size=40), min_size=1, max_size=3),
    min_events=st.integers(1, 5),
)
def test_matches_reference_semantics(tmp_path_factory, parts, min_events):
    folder = tmp_path_factory.mktemp("ref")
    files = [
        write_events(folder / (f"p{i}.csv.gz" if i == 1 else f"p{i}.csv"), rows)
        for i, rows in enumerate(parts)
    ]
    want = reference(files, min_events)
    if not want["train"] and not want["test"]:
        with pytest.raises(DataError, match="no events left"):
            prepare(files, min_events=min_events)
        return
    got = prepare(files, min_events=min_events)
    assert got.user_ids.tolist() == want["user_ids"]
    assert got.product_ids.tolist() == want["product_ids"]
    assert triples(got.without_test_pairs(), "train") == want["train"]  # file and line order
    assert len(got.train_users) == sum(len(r) for r in want["all_train"].values())
    test = {u: (item, label) for u, item, label in triples(got, "test")}
    assert test == want["test"]
    assert got.test_users.tolist() == list(range(len(want["user_ids"])))
    assert got.stats["rows_skipped_empty_id"] == want["skipped"]
    assert got.stats["events_read"] == want["read"]


def test_line_order_kept_across_parallel_reads(tmp_path):
    """One timestamp for 1M rows (~40 MB, several parallel CSV chunks): line order decides."""
    rng = np.random.default_rng(3)
    n = 1_000_000
    users, products = rng.integers(0, 500, n), rng.integers(0, 50, n)
    path = tmp_path / "ties.csv"
    body = "\n".join(
        f"2019-10-01 00:00:00 UTC,view,{p},,,,,{u},"
        for u, p in zip(users.tolist(), products.tolist(), strict=True)
    )
    path.write_text(HEADER + "\n" + body + "\n")
    got = prepare_events([path], progress=False, threads=2, memory_limit="200MB")
    last_line = n - 1 - np.unique(users[::-1], return_index=True)[1]
    want_test = dict(zip(users[last_line].tolist(), products[last_line].tolist(), strict=True))
    test = {u: item for u, item, _ in triples(got, "test")}
    assert test == want_test
    seed = got.without_test_pairs()
    keep = products != np.array([want_test[u] for u in range(500)])[users]
    np.testing.assert_array_equal(seed.user_ids[seed.train_users], users[keep])
    np.testing.assert_array_equal(seed.product_ids[seed.train_items], products[keep])
    every = np.ones(n, bool)
    every[last_line] = False
    np.testing.assert_array_equal(got.product_ids[got.train_items], products[every])
