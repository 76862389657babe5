"""What the benchmarks share: random-weight MFBlock artifacts (a per-user embedding, or a
history model with each user's recent events) and a real `recsql serve`."""

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
    folder: Path,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    emb: int = 64,
    seed: int = 0,
    probability: bool = False,
) -> Path:
    """An MFBlock artifact with random weights for these ids (speed, not quality); with
    `probability`, scored as a softmax model (the per-user-embedding default before K)."""
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
    if not probability:
        return save_mfblock(folder, weights, user_ids, item_ids)
    weights["user_log_normalizer"] = np.full(users, 12.0)  # a plausible value: speed only
    score = {"kind": "probability", "temperature": 1.0}
    return save_mfblock(folder, weights, user_ids, item_ids, score=score)


def random_history_model(
    folder: Path,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    mean_events: float = 30.0,
    keep: int = 200,
    emb: int = 64,
    seed: int = 0,
) -> Path:
    """A history-model artifact with random weights for these ids (speed, not quality):
    each user's last `keep` of a heavy-tailed number of events (mean about `mean_events`,
    most users few, some hundreds), products by a Zipf law, 95% views, an hour apart."""
    from model.history import GAP_BUCKETS, RepeatTerm

    rng = np.random.default_rng(seed)
    users, items = len(user_ids), len(item_ids)
    counts = np.minimum(1 + rng.pareto(1.5, users) * mean_events / 2, keep).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    n = int(indptr[-1])
    rank = np.minimum(rng.zipf(1.3, n) - 1, items - 1)
    product = rng.permutation(items)[rank].astype(np.int32)
    kinds = rng.choice(4, n, p=[0.95, 0.03, 0.015, 0.005]).astype(np.uint8)
    start = np.repeat(1_570_000_000 + rng.integers(0, 5_000_000, users), counts)
    times = start + (np.arange(n) - np.repeat(indptr[:-1], counts)) * 3600
    repeat = RepeatTerm(
        0.8,
        rng.normal(0, 0.3, (4, GAP_BUCKETS)),
        rng.normal(0, 0.5, GAP_BUCKETS),
        rng.normal(0, 0.5, 5),
    )
    weights = {
        "item_embeddings.weight": rng.normal(0, 0.5, (items, emb)),
        "dense_user.weight": rng.normal(0, 0.5, (emb, emb)),
        "dense_user.bias": np.zeros(emb),
        "dense_item.weight": rng.normal(0, 0.5, (emb, emb)),
        "dense_item.bias": np.zeros(emb),
        "history_position": -0.05 * np.arange(20),
        "history_type": np.array([0.0, 0.5, 0.7, -0.5]),
        "item_popularity": rng.uniform(0, 1, items),
        "user_log_normalizer": np.full(users, 12.0),  # a plausible value: speed only
        "events.indptr": indptr.astype(np.int64),
        "events.items": product,
        "events.types": kinds,
        "events.times": times.astype(np.int64),
    }
    return save_mfblock(
        folder,
        weights,
        user_ids,
        item_ids,
        score={"kind": "probability", "temperature": 1.0},
        user_tower={"kind": "history", "events": 20},
        recent_events=keep,
        repeat=repeat.to_json(),
    )


@contextlib.contextmanager
def serving(
    model_dir: Path | None,
    workers: int,
    log: Path,
    log_level: str = "WARNING",
    cpus: str = "",
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`recsql serve` on a free loopback port; yields its URL once every worker is up.
    `log_level` WARNING (the default here) drops the one INFO line per request; `cpus`
    (e.g. "0") runs the server on those cores only (taskset); `env` adds settings
    (e.g. RECSQL_EVENTS_URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serve", "--port", str(port)]
    if model_dir is not None:  # None: the models come from `env` (RECSQL_VARIANTS)
        cmd += ["--model-dir", str(model_dir)]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--workers", str(workers)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "RECSQL_LOG_LEVEL": log_level,
                **(env or {}),
            },
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
