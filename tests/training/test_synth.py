"""The synthetic event generator: exact format, determinism, marginals, learnable structure."""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest

from model.errors import DataError
from training import cli
from training.events import prepare_events
from training.synth import HEADER, SynthConfig, planted_groups, write_synthetic

ROWS = 200_000
TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC$")


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
    assert np.mean(same) > 0.85  # 0.9 planted, plus chance

    # Black box: on the prepared split, an item co-occurrence ranking beats popularity on HR@10.
    p = prepare_events([path], progress=False, threads=1)
    seen = np.zeros((len(p.user_ids), len(p.product_ids)), np.float32)
    np.add.at(seen, (p.train_users, p.train_items), 1.0)
    together = seen.T @ seen
    np.fill_diagonal(together, 0.0)

    def hit_rate(scores: np.ndarray) -> float:
        top = np.argsort(-scores[p.test_users], axis=1, kind="stable")[:, :10]
        return float(np.mean((top == p.test_items[:, None]).any(axis=1)))

    popularity = np.broadcast_to(seen.sum(axis=0), seen.shape)
    assert hit_rate(seen @ together) > hit_rate(popularity) + 0.1


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
