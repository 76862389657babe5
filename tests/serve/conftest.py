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


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The plain single-model server most HTTP tests share: 2 gevent workers."""
    tmp = tmp_path_factory.mktemp("server")
    with running(["--model-dir", str(model_dir), "--workers", "2"], tmp) as srv:
        yield srv
