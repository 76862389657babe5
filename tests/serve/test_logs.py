"""The server's log as an operator (or CloudWatch) reads it: one format, no traceback on a
clean start and stop, and gunicorn's lines about its workers kept, with their pids."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Container

import pytest
import requests

from serve.logs import JsonFormatter
from tests.serve.conftest import PRODUCT_IDS, USER_IDS, Server, running
from tests.serve.test_scripts import script_dir

TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \[(\d+)\] "
    r"([\w.]+): (.+)"
)
BODY = f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n"
# A user script stuck in native code: gevent cannot switch away, the worker stops beating.
STUCK = """
import ctypes

def model_fn(model_dir):
    return "stuck"

def transform_fn(model, data, content_type, accept):
    ctypes.CDLL(None).sleep(int(data))
    return "done", "text/plain"
"""


def records(log: str, log_format: str = "text") -> list[dict]:
    """Every line of the log as a dict (level, pid, logger, message, ...); fails on any line
    that is not one record in the format."""
    out = []
    for line in log.splitlines():
        if log_format == "json":
            doc = json.loads(line)
            assert {"time", "level", "logger", "message", "pid"} <= set(doc), line
        else:
            match = TEXT_LINE.fullmatch(line)
            assert match, f"not a log line: {line!r}"
            level, pid, logger, message = match.groups()
            doc = {"level": level, "pid": int(pid), "logger": logger, "message": message}
        out.append(doc)
    return out


def wait_for_line(server: Server, text: str, pids: Container[int] = (), timeout=20) -> dict:
    """The first record whose message holds `text`, from a process not in `pids`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in records(server.log()):
            if text in record["message"] and record["pid"] not in pids:
                return record
        time.sleep(0.1)
    raise AssertionError(f"no line with {text!r} in:\n{server.log()}")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_clean_start_requests_and_stop_log_only_records(model_dir, tmp_path, log_format) -> None:
    env = {"RECSQL_LOG_FORMAT": log_format}
    with running(["--model-dir", str(model_dir), "--workers", "2"], tmp_path, env) as srv:
        for i in range(1000):
            id_header = {"X-Amzn-SageMaker-Inference-Id": f"r{i}"}
            assert srv.post("/invocations", BODY, **id_header).status_code == 200
        assert srv.stop() == 0
    log = records(srv.log_path.read_text(), log_format)  # no traceback, no leak report
    assert [r for r in log if r["level"] != "INFO"] == []
    requests_ = [r for r in log if r["message"].startswith("invocations ")]
    assert len(requests_) == 1000 and len(log) - len(requests_) <= 15
    gunicorn = [r for r in log if r["logger"] == "gunicorn.error"]
    master = srv.proc.pid
    booted = [r for r in gunicorn if r["message"].startswith("Booting worker with pid: ")]
    workers = {r["pid"] for r in booted}  # each worker's line carries its own pid
    assert len(workers) == 2 and all(r["message"].endswith(f" {r['pid']}") for r in booted)
    assert {r["pid"] for r in requests_} <= workers
    said = [(r["pid"], r["message"]) for r in gunicorn]
    for line in ("Starting gunicorn", "Listening at", "Handling signal: term", "Shutting down"):
        assert any(pid == master and message.startswith(line) for pid, message in said), line
    assert {pid for pid, message in said if message.startswith("Worker exiting")} == workers
    if log_format == "json":
        assert {r["inference_id"] for r in requests_} == {f"r{i}" for i in range(1000)}
        first = requests_[0]
        assert (first["logger"], first["model"], first["status"], first["rows"]) == (
            "recsql.serve",
            "model",
            200,
            1,
        )
        assert first["null"] == 0 and isinstance(first["ms"], float) and first["ms"] > 0


def test_a_worker_killed_under_load_is_logged_by_the_arbiter(model_dir, tmp_path) -> None:
    with running(["--model-dir", str(model_dir), "--workers", "2"], tmp_path) as srv:
        workers = srv.workers()
        victim = workers[0]
        done = threading.Event()

        def load() -> None:
            with requests.Session() as session:
                while not done.is_set():
                    with contextlib.suppress(requests.RequestException):
                        session.post(
                            srv.url + "/invocations", BODY, headers={"Content-Type": "text/csv"}
                        )

        clients = [threading.Thread(target=load) for _ in range(4)]
        for client in clients:
            client.start()
        try:
            wait_for_line(srv, "invocations model=model status=200")
            os.kill(victim, signal.SIGKILL)
            line = wait_for_line(srv, f"Worker (pid:{victim}) was sent SIGKILL!")
            # Its replacement serves. (Stopped while a worker still boots, the server waits the
            # whole graceful timeout: that worker misses the SIGTERM.)
            wait_for_line(srv, "invocations model=model status=200", pids=workers)
        finally:
            done.set()
            for client in clients:
                client.join()
    assert (line["level"], line["pid"], line["logger"]) == ("ERROR", srv.proc.pid, "gunicorn.error")
    assert "Perhaps out of memory?" in line["message"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libc sleep through ctypes")
def test_a_request_past_the_timeout_is_logged(model_dir, tmp_path) -> None:
    served = script_dir(model_dir, tmp_path, STUCK)
    args = ["--model-dir", str(served), "--workers", "1", "--timeout", "2"]
    with running(args, tmp_path) as srv:
        worker = srv.workers()[0]
        request = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        with socket.create_connection(("127.0.0.1", srv.port)) as client:
            client.sendall(request + b"Content-Length: 2\r\n\r\n10")  # stuck for 10 s
            line = wait_for_line(srv, f"WORKER TIMEOUT (pid:{worker})")
    assert (line["level"], line["pid"], line["logger"]) == (
        "CRITICAL",
        srv.proc.pid,
        "gunicorn.error",
    )


def test_json_lines_carry_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord(
            "recsql.serve", logging.ERROR, __file__, 1, "POST %s failed", ("/x",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    doc = json.loads(line)
    assert "\n" not in line and doc["message"] == "POST /x failed"
    assert doc["traceback"].startswith("Traceback") and "ValueError: bad" in doc["traceback"]
    assert set(doc) == {"time", "level", "logger", "message", "pid", "traceback"}
