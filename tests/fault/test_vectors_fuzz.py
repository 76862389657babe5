"""Fuzz the vectors-file reader (db/udf/vectors.c) the loadable function maps.

The same reader source is built alone with AddressSanitizer into a small driver
(db/udf/fuzz_vectors.c) that opens each file and, when the file is accepted,
scores every indexed id and random ones. Thousands of truncated and byte-flipped
files go through it in subprocesses: a crash, a sanitizer report or a hang is a
test failure with the file that caused it, not a lost test run. Half of the
flipped files get a recomputed checksum, so the structural checks behind the
checksum (counts, offsets, bucket bounds, row numbers) are exercised too; files
with a bonus also get lying bonus offsets and entries, and version 1 files (an
older recsql's) are fuzzed alongside.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from db.vectors import HEADER_BYTES, write_vectors
from model import IdIndex, Recommender
from model.errors import DataError
from model.history import Bonus

ROOT = Path(__file__).resolve().parents[2]
CASES = 5000
BATCH = 500
NUM_USERS, NUM_ITEMS = 40, 30
BONUS_OFFSETS, BONUS_ENTRIES = 6, 7  # section numbers (db/udf/vectors.h)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.fail("the fuzz driver needs make and gcc (as the loadable function does)")
    out = tmp_path_factory.mktemp("fuzz") / "fuzz_vectors"
    subprocess.run(
        ["make", "-s", "-C", str(ROOT / "db/udf"), "fuzz_vectors", f"FUZZ_OUT={out}"],
        check=True,
        capture_output=True,
    )
    return out


def _bonus(rng: np.random.Generator) -> Bonus:
    """0 to 6 products per user (some users none), sorted, with values of either sign."""
    counts = rng.integers(0, 7, NUM_USERS)
    counts[:3] = 0
    items = [np.sort(rng.choice(NUM_ITEMS, c, replace=False)) for c in counts]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    values = rng.normal(0, 1.5, int(counts.sum())).astype(np.float32)
    return Bonus(indptr, np.concatenate(items).astype(np.int32), values)


def _small_recommender(softmax: bool, fallback_table: bool, bonus: bool = False) -> Recommender:
    rng = np.random.default_rng(0)
    users, items = rng.uniform(0, 1, (NUM_USERS, 8)), rng.uniform(0, 1, (NUM_ITEMS, 8))
    return Recommender(
        user_vectors=users.astype(np.float32),
        item_vectors=items.astype(np.float32),
        users=IdIndex(np.arange(NUM_USERS) * 13 - 7),
        items=IdIndex(np.arange(NUM_ITEMS) * 5 + 2**40),
        global_mean=0.5,
        item_popularity=rng.uniform(0, 1, NUM_ITEMS).astype(np.float32) if fallback_table else None,
        user_log_normalizer=np.full(NUM_USERS, 3.0, np.float32) if softmax else None,
        bonus=_bonus(rng) if bonus else None,
    )


def _section(data: bytes, number: int) -> tuple[int, int]:
    """(offset, length) of a section, from the header's table."""
    return struct.unpack_from("<QQ", data, 128 + 16 * number)


def _as_version_1(data: bytes) -> bytes:
    """A version 2 file without a bonus as an older recsql wrote it: version 1, six sections
    (the last one ending the file), the rest of the header zero."""
    out = bytearray(data)
    assert struct.unpack_from("<I", out, 28)[0] & 2 == 0, "a version 1 file has no bonus"
    end = sum(_section(data, 5))
    out = out[:end]
    struct.pack_into("<I", out, 8, 1)
    struct.pack_into("<Q", out, 16, end)
    out[96:128] = bytes(32)
    out[224:256] = bytes(32)
    _fix_crc(out)
    return bytes(out)


def _fix_crc(data: bytearray) -> None:
    data[12:16] = zlib.crc32(bytes(data[16:])).to_bytes(4, "little")


def _lie_in_bonus(data: bytearray, rng: np.random.Generator, kind: int) -> None:
    """Bonus offsets (kind 4) or entries (kind 5) that lie behind a recomputed checksum."""
    if kind == 4:
        off, length = _section(data, BONUS_OFFSETS)
        offsets = np.frombuffer(data, "<u8", length // 8, off).copy()
        for _ in range(int(rng.integers(1, 3))):
            at = int(rng.integers(0, len(offsets)))
            here, last = int(offsets[at]), int(offsets[-1])
            lies = [0, last, last + 1, (here - 1) % 2**64, here + 1, 2**63, 2**64 - 1, 2**40]
            offsets[at] = np.uint64(lies[int(rng.integers(0, len(lies)))])
        data[off : off + length] = offsets.tobytes()
    else:
        off, length = _section(data, BONUS_ENTRIES)
        entries = np.frombuffer(data, [("row", "<i4"), ("value", "<f4")], length // 8, off).copy()
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(entries)))
            if rng.random() < 0.75:  # out of range, or out of order
                rows = [-1, NUM_ITEMS, NUM_ITEMS + 1, 2**31 - 1, -(2**31), 0, 17]
                entries["row"][at] = rows[int(rng.integers(0, len(rows)))]
            else:
                values = [np.nan, np.inf, -np.inf, 1e30]
                entries["value"][at] = values[int(rng.integers(0, len(values)))]
        data[off : off + length] = entries.tobytes()
    _fix_crc(data)


def _mutants(seed_file: bytes, rng: np.random.Generator, n: int) -> list[tuple[int, bytes]]:
    """(kind, file): truncations, flips anywhere, flips behind a recomputed checksum and,
    when the seed has a bonus, lying bonus offsets (kind 4) and entries (kind 5)."""
    out = []
    size = len(seed_file)
    kinds = 6 if _section(seed_file, BONUS_ENTRIES)[1] else 4
    for k in range(n):
        data = bytearray(seed_file)
        kind = k % kinds
        if kind >= 4:
            _lie_in_bonus(data, rng, kind)
        elif kind == 0:  # truncation anywhere
            data = data[: int(rng.integers(0, size))]
        elif kind == 1:  # random flips anywhere, checksum left stale
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, size))] ^= 1 << int(rng.integers(0, 8))
        else:  # flips in the header or the index sections, checksum recomputed
            hot = HEADER_BYTES if kind == 2 else size
            for _ in range(int(rng.integers(1, 6))):
                pos = int(rng.integers(8 if kind == 2 else 16, hot))
                if rng.random() < 0.5:
                    data[pos] ^= 1 << int(rng.integers(0, 8))
                else:
                    data[pos] = int(rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01]))
            if len(data) > 16:
                _fix_crc(data)
        out.append((kind, bytes(data)))
    return out


def _run(driver: Path, paths: list[Path]) -> list[str]:
    proc = subprocess.run(
        [str(driver), *map(str, paths)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, (
        f"reader crashed (rc {proc.returncode}) on one of {paths[0]}..{paths[-1]}:\n"
        f"{proc.stderr[-3000:]}"
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == len(paths)
    return lines


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o644)
    return path


def _score(
    driver: Path, path: Path, users: np.ndarray, items: np.ndarray, mode: str = "--score"
) -> list[str]:
    """The driver's answer per pair: a score (%.9g), NULL or ERR <reason>; mode --similar:
    the pairs are two products, scored by their cosine."""
    pairs = "".join(f"{u} {i}\n" for u, i in zip(users.tolist(), items.tolist(), strict=True))
    proc = subprocess.run(
        [str(driver), mode, str(path)], input=pairs, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def _all_pairs(rec: Recommender) -> tuple[np.ndarray, np.ndarray]:
    """Every known (user, product) pair, plus an unknown user and an unknown product."""
    users = np.append(rec.users.sorted_ids, 123456)
    items = np.append(rec.items.sorted_ids, 99)
    return np.repeat(users, len(items)), np.tile(items, len(users))


def _as_floats(lines: list[str]) -> np.ndarray:
    return np.array([np.nan if line == "NULL" else float(line) for line in lines])


@pytest.mark.parametrize("softmax", [True, False])
def test_reader_adds_the_bonus_as_the_model_does(driver: Path, tmp_path: Path, softmax) -> None:
    """Every pair of a model with a bonus scores as Recommender.score, which differs from
    the same model without its bonus on exactly the pairs the bonus names."""
    rec = _small_recommender(softmax, False, bonus=True)
    if softmax:  # a normaliser over dot + bonus: no probability is clipped at 1
        logits = rec.user_vectors @ rec.item_vectors.T
        for row in range(NUM_USERS):
            logits[row, rec.bonus.row(row)[0]] += rec.bonus.row(row)[1]
        normalizer = np.log(np.exp(logits).sum(1)).astype(np.float32)
        rec = dataclasses.replace(rec, user_log_normalizer=normalizer)
    info = write_vectors(rec, tmp_path / "bonus.vectors", "null")
    assert info.bonus_pairs == len(rec.bonus.items) > 50
    users, items = _all_pairs(rec)
    got = _as_floats(_score(driver, info.path, users, items))
    want = rec.score(users, items).astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.allclose(got[ok], want[ok], rtol=1e-5, atol=1e-7)
    plain = dataclasses.replace(rec, bonus=None).score(users, items)
    named = ok & (np.abs(want - plain) > 1e-4)
    u_rows, i_rows = rec.users.rows(users[named]), rec.items.rows(items[named])
    assert named.sum() == len(rec.bonus.items)  # each entry changes its pair's score
    assert np.all(rec.bonus.lookup(u_rows, i_rows) != 0)


@pytest.mark.parametrize("version", [1, 2])
def test_reader_similarity_is_the_models_cosine(driver: Path, tmp_path: Path, version) -> None:
    """Every pair of products scores as Recommender.similarity (a zero vector: 0); an
    unknown product is NULL whatever the file's fallback policy; version 1 files too."""
    rec = _small_recommender(True, True)
    rec.item_vectors[4] = 0.0
    data = write_vectors(rec, tmp_path / "v2.vectors", "popularity").path.read_bytes()
    path = _write(tmp_path / "model.vectors", _as_version_1(data) if version == 1 else data)
    ids = np.append(rec.items.sorted_ids, 99)
    a, b = np.repeat(ids, len(ids)), np.tile(ids, len(ids))
    got = _as_floats(_score(driver, path, a, b, "--similar"))
    want = rec.similarity(a, b).astype(np.float64)
    assert (
        np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).sum() == 2 * len(ids) - 1
    )
    np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-6, atol=1e-7)
    assert (got[a == ids[4]] == 0).sum() == len(ids) - 1


def test_version_1_files_still_score(driver: Path, tmp_path: Path) -> None:
    """A file an older recsql wrote (version 1, no bonus) scores as the version 2 file of
    the same model; version 1 cannot claim a bonus, and a later version is refused."""
    rec = _small_recommender(True, True)
    v2 = write_vectors(rec, tmp_path / "v2.vectors", "popularity").path.read_bytes()
    v1 = _as_version_1(v2)
    users, items = _all_pairs(rec)
    lines = _score(driver, _write(tmp_path / "v1.vectors", v1), users, items)
    assert lines == _score(driver, tmp_path / "v2.vectors", users, items)
    assert not any(line.startswith("ERR") for line in lines)
    claims = bytearray(v1)
    claims[28] |= 2
    _fix_crc(claims)
    later = bytearray(v2)
    later[8] = 3
    _fix_crc(later)
    paths = [_write(tmp_path / "claims.vectors", claims), _write(tmp_path / "v3.vectors", later)]
    assert _run(driver, paths) == [
        "ERR vectors file: unknown flags 0x3",
        "ERR vectors file version 3; this function reads versions 1 to 2",
    ]


def test_lying_bonus_sections(driver: Path, tmp_path: Path) -> None:
    """Offsets that do not rise from 0 to the entry count are refused at open; entries
    naming products out of range or out of order are read and only miss."""
    rec = _small_recommender(False, False, bonus=True)
    good = write_vectors(rec, tmp_path / "good.vectors").path.read_bytes()
    off, length = _section(good, BONUS_OFFSETS)
    offsets = np.frombuffer(good, "<u8", length // 8, off)
    cases: dict[str, bytes] = {}
    for name, at, value in (
        ("first", 0, 1),
        ("last", len(offsets) - 1, int(offsets[-1]) - 1),
        ("past", len(offsets) - 1, 2**63),
        ("down", 10, int(offsets[9]) - 1),
        ("huge", 10, 2**64 - 1),
    ):
        lie = offsets.copy()
        lie[at] = value
        data = bytearray(good)
        data[off : off + length] = lie.tobytes()
        _fix_crc(data)
        cases[name] = bytes(data)
    no_flag = bytearray(good)
    no_flag[28] &= ~2 & 0xFF
    _fix_crc(no_flag)
    cases["no flag"] = bytes(no_flag)
    lines = _run(driver, [_write(tmp_path / f"{n}.vectors", d) for n, d in cases.items()])
    span = f"ERR vectors file: bonus offsets do not span the {len(rec.bonus.items)} entries"
    assert lines[:3] == [span] * 3, lines
    assert all("bonus offsets decrease at user row" in line for line in lines[3:5]), lines
    assert lines[5] == "ERR vectors file: bonus entries without the bonus flag"
    # entries that lie: a row past the catalogue, a negative row, two rows swapped
    e_off, e_len = _section(good, BONUS_ENTRIES)
    entries = np.frombuffer(good, [("row", "<i4"), ("value", "<f4")], e_len // 8, e_off).copy()
    run = int(np.argmax(np.diff(rec.bonus.indptr) >= 3))  # a user with 3 products or more
    start = int(rec.bonus.indptr[run])
    entries["row"][start] = NUM_ITEMS + 5
    entries["row"][start + 1], entries["row"][start + 2] = -1, 2**31 - 1
    data = bytearray(good)
    data[e_off : e_off + e_len] = entries.tobytes()
    _fix_crc(data)
    users, items = _all_pairs(rec)
    got = _as_floats(_score(driver, _write(tmp_path / "rows.vectors", data), users, items))
    want = rec.score(users, items).astype(np.float64)
    touched = (rec.users.rows(users) == run) & np.isin(
        rec.items.rows(items), rec.bonus.items[start : start + 3]
    )
    assert touched.sum() == 3
    plain = dataclasses.replace(rec, bonus=None).score(users, items)
    assert np.allclose(got[touched], plain[touched], rtol=1e-5)  # those bonuses are lost
    others = ~touched & ~np.isnan(want)
    assert np.allclose(got[others], want[others], rtol=1e-5, atol=1e-7)


def test_writer_refuses_a_bonus_the_reader_could_not_search(tmp_path: Path) -> None:
    rec = _small_recommender(True, False, bonus=True)
    bonus = rec.bonus
    unsorted = bonus.items.copy()
    run = int(np.argmax(np.diff(bonus.indptr) >= 2))
    lo = int(bonus.indptr[run])
    unsorted[lo], unsorted[lo + 1] = unsorted[lo + 1], unsorted[lo]
    bad = {
        "offsets": Bonus(bonus.indptr[:-1], bonus.items, bonus.values),
        "rise": Bonus(bonus.indptr[::-1].copy(), bonus.items, bonus.values),
        "product rows": Bonus(bonus.indptr, bonus.items + NUM_ITEMS, bonus.values),
        "sorted": Bonus(bonus.indptr, unsorted, bonus.values),
    }
    for reason, lie in bad.items():
        with pytest.raises(DataError, match=reason):
            write_vectors(dataclasses.replace(rec, bonus=lie), tmp_path / "x.vectors")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


@pytest.mark.slow
def test_reader_survives_truncations_and_byte_flips(driver: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(20261203)
    seeds = []
    models = [(True, True, False), (False, False, False), (True, False, True), (False, True, True)]
    for n, (softmax, table, bonus) in enumerate(models):
        info = write_vectors(
            _small_recommender(softmax, table, bonus),
            tmp_path / f"seed{n}.vectors",
            "popularity" if table else "mean",
        )
        seeds.append(info.path.read_bytes())
    seeds.append(_as_version_1(seeds[0]))  # an older recsql's file
    seed_paths = [_write(tmp_path / f"seed{n}.vectors", data) for n, data in enumerate(seeds)]
    seed_lines = _run(driver, seed_paths)
    assert all(line.startswith("OK") for line in seed_lines), seed_lines
    outcomes: dict[str, int] = {}
    by_kind: dict[int, dict[str, int]] = {}
    per_seed = CASES // len(seeds)
    for s, seed_file in enumerate(seeds):
        mutants = _mutants(seed_file, rng, per_seed)
        for start in range(0, len(mutants), BATCH):
            batch = mutants[start : start + BATCH]
            paths = [
                _write(tmp_path / f"case-{s}-{start + k}.vectors", data)
                for k, (_, data) in enumerate(batch)
            ]
            for (kind, _), line in zip(batch, _run(driver, paths), strict=True):
                assert line.startswith(("OK ", "ERR ")), line
                key = "OK" if line.startswith("OK") else re.sub(r"\d+", "N", line[4:])
                outcomes[key] = outcomes.get(key, 0) + 1
                group = "OK" if key == "OK" else "bonus" if "bonus offsets" in key else "other"
                by_kind.setdefault(kind, {})
                by_kind[kind][group] = by_kind[kind].get(group, 0) + 1
            for path in paths:
                path.unlink()
    assert sum(outcomes.values()) == per_seed * len(seeds)
    # every kind of damage was met and named, and some damaged files were still read
    # (flips in vectors or ids behind a recomputed checksum), so lookups were fuzzed too
    reasons = " ".join(outcomes)
    for reason in (
        "truncated",
        "checksum mismatch",
        "version",
        "section",
        "bad magic",
        "bonus offsets do not span",
        "bonus offsets decrease",
    ):
        assert reason in reasons, outcomes
    assert outcomes.get("OK", 0) > 50, outcomes
    # lying offsets are caught at open (a few lies happen to keep them valid); lying
    # entries are never refused: they are only compared, so they can only miss
    assert set(by_kind[4]) <= {"OK", "bonus"}, by_kind
    assert by_kind[4].get("OK", 0) < by_kind[4]["bonus"] / 4, by_kind
    assert set(by_kind[5]) == {"OK"}, by_kind
