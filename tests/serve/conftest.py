"""Fixtures: a small random MFBlock artifact and real gunicorn servers on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from model import load_model, save_mfblock

ROOT = Path(__file__).resolve().parents[2]
NUM_EMB = 8
USER_IDS = np.arange(300, dtype=np.int64) * 7 + 10_000  # non-contiguous external ids
PRODUCT_IDS = np.arange(500, dtype=np.int64) * 3 + 500_000
GLOBAL_MEAN = 0.25


def random_weights(seed: int, users: int, items: int, emb: int = NUM_EMB) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "user_embeddings.weight": rng.normal(0, 0.5, (users, emb)),
        "item_embeddings.weight": rng.normal(0, 0.5, (items, emb)),
        "dense_user.weight": rng.normal(0, 0.5, (emb, emb)),
        "dense_user.bias": np.full(emb, 0.1),
        "dense_item.weight": rng.normal(0, 0.5, (emb, emb)),
        "dense_item.bias": np.full(emb, 0.1),
        "item_popularity": rng.uniform(0, 1, items),
    }


def make_artifact(path: Path, seed: int = 0) -> Path:
    weights = random_weights(seed, len(USER_IDS), len(PRODUCT_IDS))
    return save_mfblock(path, weights, USER_IDS, PRODUCT_IDS, global_mean=GLOBAL_MEAN)


def make_history_artifact(path: Path, seed: int = 0, keep: int = 30) -> Path:
    """A random history model (model/history.py): each user's last `keep` events, some
    products repeated, a repeat term, and log normalisers that make scores sum to 1."""
    from model.history import GAP_BUCKETS, HistoryModel, HistoryTower, RecentEvents, RepeatTerm
    from model.recommender import relu_tower

    rng = np.random.default_rng(seed)
    weights = random_weights(seed, len(USER_IDS), len(PRODUCT_IDS))
    del weights["user_embeddings.weight"]
    counts = rng.integers(0, keep + 10, len(USER_IDS))
    users = np.repeat(np.arange(len(USER_IDS)), counts)
    items = rng.integers(0, 40, len(users))  # a small shelf: users come back to products
    kinds = rng.choice(4, len(users), p=[0.7, 0.15, 0.1, 0.05])
    times = 1_570_000_000 + np.cumsum(rng.choice([5, 600, 90_000, 4_000_000], len(users)))
    events = RecentEvents.build(users, items, kinds, times, len(USER_IDS), keep)
    tower = HistoryTower(-0.1 * np.arange(10), np.array([0.0, 0.4, 0.8, -0.5]))
    repeat = RepeatTerm(
        0.9,
        rng.normal(0, 0.4, (4, GAP_BUCKETS)),
        rng.normal(0, 0.8, GAP_BUCKETS),
        rng.normal(0, 0.8, 5),
    )
    history = HistoryModel(
        tower,
        weights["item_embeddings.weight"].astype(np.float32),
        weights["dense_user.weight"].astype(np.float32),
        weights["dense_user.bias"].astype(np.float32),
        1.0,
        repeat,
    )
    user_vectors = history.user_vectors(events)
    logits = (
        user_vectors
        @ relu_tower(
            weights["item_embeddings.weight"],
            weights["dense_item.weight"],
            weights["dense_item.bias"],
        ).T
    )
    bonus = repeat.bonus(events)
    rows = np.repeat(np.arange(len(USER_IDS)), np.diff(bonus.indptr))
    logits[rows, bonus.items] += bonus.values
    top = logits.max(1, keepdims=True)
    weights.update(
        {
            "history_position": tower.position,
            "history_type": tower.event_type,
            "user_log_normalizer": top[:, 0] + np.log(np.exp(logits - top).sum(1)),
            "events.indptr": events.indptr,
            "events.items": events.items,
            "events.types": events.types,
            "events.times": events.times,
        }
    )
    return save_mfblock(
        path,
        weights,
        USER_IDS,
        PRODUCT_IDS,
        score={"kind": "probability", "temperature": 1.0},
        user_tower={"kind": "history", "events": 10},
        recent_events=keep,
        repeat=repeat.to_json(),
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("mfblock") / "model")


@pytest.fixture(scope="session")
def recommender(model_dir: Path):
    return load_model(model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `recsql serve` process (gunicorn master + workers) on a loopback port."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "RECSQL_"))
        }
        full_env = {**inherited, "PYTHONPATH": str(ROOT), **env}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "--port", str(self.port), *args],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.session = requests.Session()

    def wait_listening(self, timeout: float = 60) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                requests.get(self.url + "/ping", timeout=2)
                return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not answer in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: bytes | str, content_type: str | None = "text/csv", **headers):
        if content_type is not None:
            headers["Content-Type"] = content_type
        return self.session.post(self.url + path, data=body, headers=headers, timeout=30)

    def get(self, path: str, **kwargs):
        return self.session.get(self.url + path, timeout=30, **kwargs)

    def workers(self) -> list[int]:
        """PIDs of the gunicorn workers (children of the master)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.session.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(args: list[str], tmp: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = Server(args, env or {}, tmp / "server.log")
    try:
        yield server.wait_listening()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def history_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A history model (make_history_artifact), one per test module."""
    return make_history_artifact(tmp_path_factory.mktemp("history") / "model")


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The plain single-model server most HTTP tests share: 2 gevent workers."""
    tmp = tmp_path_factory.mktemp("server")
    with running(["--model-dir", str(model_dir), "--workers", "2"], tmp) as srv:
        yield srv
