"""Data capture (serve/capture.py): SageMaker's record format and S3 key layout on a local
disk, sampling, rotation, the size bound, kill -9 safety and a request path that never
blocks or fails. Real files and real processes throughout."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from serve.capture import Capture, iter_records
from tests.serve.conftest import ROOT

HOUR = re.compile(r"^\d{4}/\d{2}/\d{2}/\d{2}$")


def _files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.jsonl"))


def _python(script: str, **kwargs: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, **kwargs)


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_record_format_and_layout(tmp_path: Path) -> None:
    capture = Capture(tmp_path, "recsql-endpoint")
    capture.record(
        "AllTraffic",
        "req-7",
        b"512,1001\n513,1002\n",
        "text/csv",
        b"[0.5,0.25]",
        "application/json",
    )
    capture.close()
    assert (capture.written, capture.dropped) == (1, 0)

    [path] = _files(tmp_path)
    lines = path.read_bytes().split(b"\n")
    assert lines[1:] == [b""]  # exactly one complete line
    raw = json.loads(lines[0])
    assert raw == {
        "captureData": {
            "endpointInput": {
                "observedContentType": "text/csv",
                "mode": "INPUT",
                "data": "512,1001\n513,1002\n",
                "encoding": "CSV",
            },
            "endpointOutput": {
                "observedContentType": "application/json",
                "mode": "OUTPUT",
                "data": "[0.5,0.25]",
                "encoding": "JSON",
            },
        },
        "eventMetadata": {
            "eventId": raw["eventMetadata"]["eventId"],
            "inferenceId": "req-7",
            "inferenceTime": raw["eventMetadata"]["inferenceTime"],
        },
        "eventVersion": "0",
    }
    assert uuid.UUID(raw["eventMetadata"]["eventId"]).version == 4
    when = time.strptime(raw["eventMetadata"]["inferenceTime"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(time.mktime(when) - time.mktime(time.gmtime())) < 3600

    # <endpoint>/<variant>/YYYY/MM/DD/HH/<file>.jsonl, HH the UTC hour of inferenceTime
    rel = path.relative_to(tmp_path).parts
    assert rel[:2] == ("recsql-endpoint", "AllTraffic")
    assert "/".join(rel[2:6]) == time.strftime("%Y/%m/%d/%H", when)
    assert HOUR.match("/".join(rel[2:6]))

    [read] = iter_records(tmp_path)
    assert read == {**raw, "variant": "AllTraffic"}


def test_no_inference_id_and_variants_filtered(tmp_path: Path) -> None:
    capture = Capture(tmp_path, "ep")
    capture.record("A", None, b"1,2\n", "text/csv", b"0.5\n", "text/csv")
    capture.record("B", "x", b"3,4\n", "text/csv", b"0.7\n", "text/csv")
    Capture(tmp_path, "other").record("A", None, b"", "text/csv", b"", "text/csv")
    capture.close()
    [a] = iter_records(tmp_path, "ep", "A")
    assert "inferenceId" not in a["eventMetadata"] and a["variant"] == "A"
    assert [r["variant"] for r in iter_records(tmp_path, variant="B")] == ["B"]
    _wait_for(lambda: len(list(iter_records(tmp_path))) == 3)
    assert len(list(iter_records(tmp_path, endpoint="ep"))) == 2


@pytest.mark.parametrize(
    ("content_type", "data", "encoding"),
    [
        ("text/csv", b"1,2\n", "CSV"),
        ("text/csv; charset=utf-8", "1,caf\u00e9\n".encode(), "CSV"),
        ("application/json", b'{"instances": [1]}', "JSON"),
        ("application/jsonlines", b'{"a": 1}\n{"a": 2}\n', "JSON"),
        ("application/x-npy", b"\x93NUMPY\x01\x00\xff\x00", "BASE64"),
        ("text/csv", b"\xff\xfe not utf-8", "BASE64"),  # declared text that is not: kept exact
        (None, b"\x00\x01", "BASE64"),
    ],
)
def test_encodings(tmp_path: Path, content_type: str | None, data: bytes, encoding: str) -> None:
    capture = Capture(tmp_path, "ep")
    capture.record("v", None, data, content_type, data, content_type)
    capture.close()
    [record] = iter_records(tmp_path)
    for key, mode in (("endpointInput", "INPUT"), ("endpointOutput", "OUTPUT")):
        part = record["captureData"][key]
        assert part["mode"] == mode and part["encoding"] == encoding
        assert part["observedContentType"] == (content_type or "application/octet-stream")
        got = base64.b64decode(part["data"]) if encoding == "BASE64" else part["data"].encode()
        assert got == data


def test_sample_zero_writes_nothing(tmp_path: Path) -> None:
    capture = Capture(tmp_path, "ep", sample_percent=0)
    for _ in range(200):
        capture.record("v", None, b"1,2\n", "text/csv", b"0.5\n", "text/csv")
    capture.close()
    assert _files(tmp_path) == [] and capture.written == 0


def test_sample_half_is_binomial(tmp_path: Path) -> None:
    n = 2000
    capture = Capture(tmp_path, "ep", sample_percent=50)
    for _ in range(n):
        capture.record("v", None, b"1,2\n", "text/csv", b"0.5\n", "text/csv")
    capture.close()
    kept = len(list(iter_records(tmp_path)))
    assert kept == capture.written and capture.dropped == 0
    assert abs(kept - n / 2) < 5 * (n * 0.25) ** 0.5  # 5 standard deviations: ~1e-6 to fail


@pytest.mark.parametrize("percent", [-1, 100.5])
def test_bad_settings_are_refused(tmp_path: Path, percent: float) -> None:
    with pytest.raises(ValueError, match="0-100"):
        Capture(tmp_path, "ep", sample_percent=percent)
    with pytest.raises(ValueError, match="max_file_bytes"):
        Capture(tmp_path, "ep", max_file_bytes=2000, max_total_bytes=1000)
    with pytest.raises(ValueError, match="endpoint"):
        Capture(tmp_path, "../up")


def test_rotation_at_max_file_bytes(tmp_path: Path) -> None:
    capture = Capture(tmp_path, "ep", max_file_bytes=1000)
    for i in range(20):
        capture.record("v", str(i), b"1,2\n" * 20, "text/csv", b"0.5\n" * 20, "text/csv")
    capture.close()
    files = _files(tmp_path)
    assert len(files) > 3
    assert all(0 < f.stat().st_size <= 1000 for f in files)
    # oldest file first, each file's records in order: nothing lost or reordered
    assert [r["eventMetadata"]["inferenceId"] for r in iter_records(tmp_path)] == [
        str(i) for i in range(20)
    ]


def test_a_record_larger_than_a_file_gets_a_file_of_its_own(tmp_path: Path) -> None:
    capture = Capture(tmp_path, "ep", max_file_bytes=100)
    big = b"9" * 500
    for _ in range(3):
        capture.record("v", None, big, "text/csv", big, "text/csv")
    capture.close()
    assert len(_files(tmp_path)) == 3 and len(list(iter_records(tmp_path))) == 3


def _old_file(root: Path, hour: str, size: int) -> Path:
    """A capture file of `size` bytes in an earlier hour, as a previous run left it."""
    path = root / "ep" / "v" / hour / "00-00-000-1-00000000.jsonl"
    path.parent.mkdir(parents=True)
    line = json.dumps({"captureData": {}, "eventMetadata": {}, "eventVersion": "0"}) + "\n"
    path.write_text(line + "x" * (size - len(line) - 1) + "\n")
    return path


def test_total_bound_deletes_oldest_and_empty_hours(tmp_path: Path) -> None:
    oldest = _old_file(tmp_path, "2019/12/31/23", 1000)
    older = _old_file(tmp_path, "2020/01/01/00", 1000)
    old = _old_file(tmp_path, "2020/01/01/01", 1000)
    capture = Capture(tmp_path, "ep", max_file_bytes=1000, max_total_bytes=1500)
    capture.record("v", "new", b"1,2\n", "text/csv", b"0.5\n", "text/csv")
    capture.close()

    assert not oldest.exists() and not (tmp_path / "ep" / "v" / "2019").exists()
    assert not older.exists() and not older.parent.exists()
    assert older.parent.parent.exists()  # the day still holds hour 01
    assert old.exists()
    assert sum(f.stat().st_size for f in _files(tmp_path)) <= 1500
    assert [r["eventMetadata"].get("inferenceId") for r in iter_records(tmp_path)] == [None, "new"]


def test_kill_9_leaves_only_whole_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A child writes records (some large, rotating files) until SIGKILL; every line the
    reader returns parses, and a truncated or garbled line is skipped, not returned."""
    child = _python(
        f"""
        from pathlib import Path
        from serve.capture import Capture
        capture = Capture(Path({str(tmp_path)!r}), "ep", max_file_bytes=256 * 1024)
        i = 0
        while True:
            body = (b"%d,%d\\n" % (i, i)) * (1 + (i % 7) * 5000)
            capture.record("v", str(i), body, "text/csv", b"[0.5]", "application/json")
            i += 1
        """
    )
    try:
        _wait_for(lambda: sum(1 for _ in iter_records(tmp_path)) >= 300)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    complete = sum(f.read_bytes().count(b"\n") for f in _files(tmp_path))
    records = list(iter_records(tmp_path))
    assert len(records) >= 300
    assert len(records) <= complete
    for r in records:
        i = r["eventMetadata"]["inferenceId"]
        assert r["captureData"]["endpointInput"]["data"].startswith(f"{i},{i}\n")

    newest = _files(tmp_path)[-1]
    with open(newest, "ab") as f:  # what a dying write leaves: no newline at the end
        f.write(b'{"captureData": {"endpointInput": {"data": "12')
    middle = _files(tmp_path)[0]
    with open(middle, "ab") as f:
        f.write(b"not json\n")
    with caplog.at_level(logging.DEBUG, logger="recsql.serve.capture"):
        again = list(iter_records(tmp_path))
    assert again == records
    assert "skipped" in caplog.text


def test_unwritable_directory_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")  # fails for root too, unlike chmod
    capture = Capture(blocked, "ep")
    with caplog.at_level(logging.WARNING, logger="recsql.serve.capture"):
        for _ in range(5):
            capture.record("v", None, b"1,2\n", "text/csv", b"0.5\n", "text/csv")
        capture.close()
    assert (capture.written, capture.dropped) == (0, 5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once a minute, not once a record
    assert "dropping records" in warnings[0].getMessage()


def test_bad_variant_name_is_dropped_not_raised(tmp_path: Path) -> None:
    capture = Capture(tmp_path, "ep")
    capture.record("../escape", None, b"1", "text/csv", b"1", "text/csv")
    capture.close()
    assert (capture.written, capture.dropped) == (0, 1)
    assert _files(tmp_path) == []


def test_stuck_writer_drops_instead_of_blocking(tmp_path: Path) -> None:
    capture = Capture(tmp_path, "ep", queue_records=4)
    capture.record("v", "first", b"1", "text/csv", b"1", "text/csv")
    _wait_for(lambda: capture.written == 1)  # the writer is idle, waiting for work
    with capture._write_lock:  # stands in for a stalled disk: the writer waits on it
        for i in range(10):
            capture.record("v", str(i), b"1", "text/csv", b"1", "text/csv")
        # the writer holds at most one popped record; the queue holds 4; the rest dropped
        assert 5 <= capture.dropped <= 6
    capture.close()
    assert capture.written + capture.dropped == 11
    assert len(list(iter_records(tmp_path))) == capture.written


def test_queue_is_bounded_in_bytes(tmp_path: Path) -> None:
    capture = Capture(tmp_path, "ep", queue_bytes=1000)
    capture.record("v", None, b"1", "text/csv", b"1", "text/csv")
    with capture._write_lock:
        capture.record("v", None, b"x" * 2000, "text/csv", b"1", "text/csv")
        assert capture.dropped == 1
    capture.close()


def test_gevent_worker_loop_keeps_running_while_the_writer_is_stuck(tmp_path: Path) -> None:
    """Under monkey-patching the writer is a real OS thread: with its disk stalled, greenlets
    keep running and record() keeps returning; once the disk is back, records land."""
    child = _python(
        f"""
        from gevent import monkey
        monkey.patch_all()
        import json, gevent
        from pathlib import Path
        from serve.capture import Capture
        capture = Capture(Path({str(tmp_path)!r}), "ep", queue_records=8)
        capture.record("v", "warm", b"1", "text/csv", b"1", "text/csv")
        beats = []
        def heartbeat():
            while True:
                beats.append(1)
                gevent.sleep(0.001)
        gevent.spawn(heartbeat)
        with capture._write_lock:
            jobs = [gevent.spawn(capture.record, "v", str(i), b"1", "text/csv", b"1", "text/csv")
                    for i in range(50)]
            gevent.joinall(jobs, timeout=30)
            before = len(beats)
            gevent.sleep(0.05)
            alive = len(beats) > before
        capture.close()
        print(json.dumps({{"done": all(j.ready() for j in jobs), "alive": alive,
                          "written": capture.written, "dropped": capture.dropped}}))
        """,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    result = json.loads(out)
    assert result["done"] and result["alive"]
    assert result["written"] + result["dropped"] == 51 and result["dropped"] >= 40
    assert len(list(iter_records(tmp_path))) == result["written"]


def test_built_before_fork_writes_from_the_child(tmp_path: Path) -> None:
    """gunicorn may build the server before forking workers: each process gets its own
    writer thread and its own files (its pid in the name)."""
    capture = Capture(tmp_path, "ep")
    capture.record("v", "parent", b"1", "text/csv", b"1", "text/csv")
    pid = os.fork()
    if pid == 0:  # the child: record, flush, and leave without running pytest's teardown
        code = 1
        try:
            capture.record("v", "child", b"1", "text/csv", b"1", "text/csv")
            capture.close()
            code = 0 if capture.written == 1 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    capture.close()
    assert os.waitstatus_to_exitcode(status) == 0
    ids = sorted(r["eventMetadata"]["inferenceId"] for r in iter_records(tmp_path))
    assert ids == ["child", "parent"]
    pids = {f.name.split("-")[3] for f in _files(tmp_path)}
    assert pids == {str(os.getpid()), str(pid)}


def test_a_worker_whose_file_another_deleted_starts_a_new_one(tmp_path: Path) -> None:
    """Two workers share the tree; one's size bound deletes the other's open file. The
    next record of the first must land in a new file, not in the deleted one."""
    first = Capture(tmp_path, "ep", max_file_bytes=800, max_total_bytes=800)
    second = Capture(tmp_path, "ep", max_file_bytes=800, max_total_bytes=800)
    first.record("v", "r1", b"1", "text/csv", b"0.5", "text/csv")  # ~350 bytes: room for 2
    _wait_for(lambda: first.written == 1)
    second.record("v", "r2", b"1" * 1000, "text/csv", b"0.5", "text/csv")
    _wait_for(lambda: second.written == 1)
    assert [r["eventMetadata"]["inferenceId"] for r in iter_records(tmp_path)] == ["r2"]
    first.record("v", "r3", b"1", "text/csv", b"0.5", "text/csv")
    first.close()
    second.close()
    assert [r["eventMetadata"]["inferenceId"] for r in iter_records(tmp_path)] == ["r2", "r3"]
