"""Fuzz the vectors-file reader (db/udf/vectors.c) the loadable function maps.

The same reader source is built alone with AddressSanitizer into a small driver
(db/udf/fuzz_vectors.c) that opens each file and, when the file is accepted,
scores every indexed id and random ones. Thousands of truncated and byte-flipped
files go through it in subprocesses: a crash, a sanitizer report or a hang is a
test failure with the file that caused it, not a lost test run. Half of the
flipped files get a recomputed checksum, so the structural checks behind the
checksum (counts, offsets, bucket bounds, row numbers) are exercised too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from db.vectors import HEADER_BYTES, write_vectors
from model import IdIndex, Recommender

ROOT = Path(__file__).resolve().parents[2]
CASES = 4000
BATCH = 500


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


def _small_recommender(softmax: bool, fallback_table: bool) -> Recommender:
    rng = np.random.default_rng(0)
    users, items = rng.uniform(0, 1, (40, 8)), rng.uniform(0, 1, (30, 8))
    return Recommender(
        user_vectors=users.astype(np.float32),
        item_vectors=items.astype(np.float32),
        users=IdIndex(np.arange(40) * 13 - 7),
        items=IdIndex(np.arange(30) * 5 + 2**40),
        global_mean=0.5,
        item_popularity=rng.uniform(0, 1, 30).astype(np.float32) if fallback_table else None,
        user_log_normalizer=np.full(40, 3.0, np.float32) if softmax else None,
    )


def _fix_crc(data: bytearray) -> None:
    data[12:16] = zlib.crc32(bytes(data[16:])).to_bytes(4, "little")


def _mutants(seed_file: bytes, rng: np.random.Generator, n: int) -> list[bytes]:
    out = []
    size = len(seed_file)
    for k in range(n):
        data = bytearray(seed_file)
        kind = k % 4
        if kind == 0:  # truncation anywhere
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
        out.append(bytes(data))
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


@pytest.mark.slow
def test_reader_survives_truncations_and_byte_flips(driver: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(20261203)
    seeds = []
    for n, (softmax, table) in enumerate([(True, True), (False, False), (True, False)]):
        info = write_vectors(
            _small_recommender(softmax, table),
            tmp_path / f"seed{n}.vectors",
            "popularity" if table else "mean",
        )
        seeds.append(info.path.read_bytes())
    seed_lines = _run(driver, [tmp_path / f"seed{n}.vectors" for n in range(3)])
    assert all(line.startswith("OK") for line in seed_lines), seed_lines
    outcomes: dict[str, int] = {}
    per_seed = CASES // len(seeds)
    for s, seed_file in enumerate(seeds):
        mutants = _mutants(seed_file, rng, per_seed)
        for start in range(0, len(mutants), BATCH):
            paths = []
            for k, data in enumerate(mutants[start : start + BATCH]):
                path = tmp_path / f"case-{s}-{start + k}.vectors"
                path.write_bytes(data)
                path.chmod(0o644)
                paths.append(path)
            for line in _run(driver, paths):
                assert line.startswith(("OK ", "ERR ")), line
                key = "OK" if line.startswith("OK") else re.sub(r"\d+", "N", line[4:])
                outcomes[key] = outcomes.get(key, 0) + 1
            for path in paths:
                path.unlink()
    assert sum(outcomes.values()) == per_seed * len(seeds)
    # every kind of damage was met and named, and some damaged files were still read
    # (flips in vectors or ids behind a recomputed checksum), so lookups were fuzzed too
    reasons = " ".join(outcomes)
    for reason in ("truncated", "checksum mismatch", "version", "section", "bad magic"):
        assert reason in reasons, outcomes
    assert outcomes.get("OK", 0) > 50, outcomes
