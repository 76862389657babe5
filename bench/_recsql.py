"""What the benchmarks share: a random-weight MFBlock artifact and a real `recsql serve`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import save_mfblock  # noqa: E402


def random_mfblock(
    folder: Path, user_ids: np.ndarray, item_ids: np.ndarray, emb: int = 64, seed: int = 0
) -> Path:
    """An MFBlock artifact with random weights for these ids (speed, not quality)."""
    rng = np.random.default_rng(seed)
    users, items = len(user_ids), len(item_ids)
    weights = {
        "user_embeddings.weight": rng.normal(0, 0.5, (users, emb)),
        "item_embeddings.weight": rng.normal(0, 0.5, (items, emb)),
        "dense_user.weight": rng.normal(0, 0.5, (emb, emb)),
        "dense_user.bias": np.zeros(emb),
        "dense_item.weight": rng.normal(0, 0.5, (emb, emb)),
        "dense_item.bias": np.zeros(emb),
        "item_popularity": rng.uniform(0, 1, items),
    }
    return save_mfblock(folder, weights, user_ids, item_ids)


@contextlib.contextmanager
def serving(
    model_dir: Path, workers: int, log: Path, log_level: str = "WARNING", cpus: str = ""
) -> Iterator[str]:
    """`recsql serve` on a free loopback port; yields its URL once every worker is up.
    `log_level` WARNING (the default here) drops the one INFO line per request; `cpus`
    (e.g. "0") runs the server on those cores only (taskset)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serve", "--model-dir", str(model_dir), "--port", str(port)]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--workers", str(workers)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "RECSQL_LOG_LEVEL": log_level},
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"recsql serve did not start:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url + "/ping", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(1.0)  # /ping answered by one worker: let the others boot too
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
