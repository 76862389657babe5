"""docker/entrypoint.sh, run directly with a stand-in `recsql` first on PATH."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.deploy.dockerfile import ROOT

ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"

# Records its PID and arguments, then (for the signal test) waits for SIGTERM.
FAKE_RECSQL = """#!/bin/sh
printf '%s\\n' "$$" > "$RECORD.pid"
printf '%s\\n' "$@" > "$RECORD.args"
if [ -n "${WAIT_FOR_TERM:-}" ]; then
    trap 'echo TERM > "$RECORD.signal"; exit 0' TERM
    touch "$RECORD.ready"
    while :; do sleep 0.05; done
fi
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "recsql"
    fake.write_text(FAKE_RECSQL)
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGEMAKER_")}
    return {
        **clean,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "RECORD": str(tmp_path / "call"),
        "RECSQL_PORT_FILE": str(tmp_path / "serve.port"),
    }


def run(env: dict[str, str], *args: str) -> tuple[list[str], int, int]:
    """(arguments recsql got, its PID, the PID the entrypoint was started as)."""
    proc = subprocess.Popen([str(ENTRYPOINT), *args], env=env)
    assert proc.wait(timeout=20) == 0
    record = Path(env["RECORD"])
    got = Path(f"{record}.args").read_text().splitlines()
    return got, int(Path(f"{record}.pid").read_text()), proc.pid


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), ["serve", "--container", "--port", "8080"]),
        (("serve",), ["serve", "--container", "--port", "8080"]),
        (("serve", "--workers", "2"), ["serve", "--container", "--port", "8080", "--workers", "2"]),
        (("train",), ["train", "--no-progress"]),
        (
            ("train", "data/events.csv", "--epochs", "2"),
            ["train", "--no-progress", "data/events.csv", "--epochs", "2"],
        ),
        (
            ("evaluate", "ev dir", "--model-dir", "/opt/ml/model"),
            ["evaluate", "ev dir", "--model-dir", "/opt/ml/model"],
        ),
        (("--help",), ["--help"]),
    ],
)
def test_routes_arguments_and_execs(env: dict[str, str], args: tuple, expected: list) -> None:
    got, recsql_pid, started_pid = run(env, *args)
    assert got == expected
    # exec: recsql replaced the shell, so it is the process SageMaker signals.
    assert recsql_pid == started_pid


def test_serve_takes_the_port_sagemaker_assigns(env: dict[str, str]) -> None:
    env["SAGEMAKER_BIND_TO_PORT"] = "9123"
    got, _, _ = run(env, "serve")
    assert got[:4] == ["serve", "--container", "--port", "9123"]
    assert Path(env["RECSQL_PORT_FILE"]).read_text().strip() == "9123"


def test_train_leaves_no_port_file(env: dict[str, str]) -> None:
    run(env, "train")
    assert not Path(env["RECSQL_PORT_FILE"]).exists()


def test_sigterm_reaches_recsql(env: dict[str, str]) -> None:
    env["WAIT_FOR_TERM"] = "1"
    proc = subprocess.Popen([str(ENTRYPOINT), "serve"], env=env)
    ready = Path(env["RECORD"] + ".ready")
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert Path(env["RECORD"] + ".signal").read_text().strip() == "TERM"


class _Ping(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/ping" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ping_server():
    servers = []

    def start(status: int) -> int:
        handler = type("Ping", (_Ping,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _healthcheck(env: dict[str, str]) -> int:
    return subprocess.run([str(ENTRYPOINT), "healthcheck"], env=env, timeout=20).returncode


def test_healthcheck_follows_ping(env: dict[str, str], ping_server) -> None:
    port_file = Path(env["RECSQL_PORT_FILE"])
    assert _healthcheck(env) == 0  # no port file: not a serving container
    port_file.write_text(f"{ping_server(200)}\n")
    assert _healthcheck(env) == 0
    port_file.write_text(f"{ping_server(503)}\n")  # e.g. model not loaded yet
    assert _healthcheck(env) == 1


def test_healthcheck_fails_when_nothing_listens(env: dict[str, str], ping_server) -> None:
    port = ping_server(200)
    Path(env["RECSQL_PORT_FILE"]).write_text(f"{port}\n")
    assert _healthcheck(env) == 0
    # a port nobody listens on any more
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    Path(env["RECSQL_PORT_FILE"]).write_text(f"{free}\n")
    assert _healthcheck(env) == 1
