"""Data capture: what each sampled request asked and was answered, as SageMaker writes it.

    DIR/<endpoint>/<variant>/YYYY/MM/DD/HH/<MM-SS-mmm>-<pid>-<n>-<random>.jsonl

(SageMaker's S3 key layout; HH is the UTC hour of the inference time), one JSON object a line:

    {"captureData": {"endpointInput": {"observedContentType": "text/csv", "mode": "INPUT",
                                       "data": "1,2\\n", "encoding": "CSV"},
                     "endpointOutput": {"observedContentType": "application/json",
                                        "mode": "OUTPUT", "data": "[0.5]", "encoding": "JSON"}},
     "eventMetadata": {"eventId": "<uuid4>", "inferenceId": "<if given>",
                       "inferenceTime": "2026-12-06T07:00:00Z"},
     "eventVersion": "0"}

so SageMaker Model Monitor, or anything that reads its captures, reads these too.

Each worker process writes its own files (the pid is in the name): no file has two
writers, so a file only ever ends torn when its one writer died in mid-write, and rotation
and the hour change need no locks between processes. Every record goes out in one write()
of a complete line on an O_APPEND descriptor. A SIGKILL can still cut a large write short
(Linux checks for a fatal signal between pages), and a full disk can too: the writer then
starts a new file, and `iter_records` skips any line that has no newline or is not JSON.

record() never blocks and never raises: it samples, stamps the time and hands the raw
bytes to a bounded queue; a real OS thread encodes and writes them, every FLUSH_SECONDS
or once the queue is half full (waking it for every record made each request wait for
the GIL: 1 pair over HTTP went from 3,352 to 2,289 requests/s). A full queue drops
the record and counts it in `dropped`; so does a failed write (its warning is logged at
most once a minute). Under gevent, `threading` is patched into greenlets, and file writes
in a greenlet stall the whole worker: the writer thread and its locks therefore come from
gevent's saved originals (`gevent.monkey.get_original`), which are the ordinary ones in a
process that gevent did not patch. (gevent's threadpool would do too, but the writer
would hold one of its slots for the worker's lifetime.)

Bounds: a new file is started rather than let one pass `max_file_bytes` (a record larger
than that gets a file of its own); once the
whole capture tree passes `max_total_bytes`, the oldest files (by hour, then name) are
deleted and the emptied hour folders removed. The tree is measured again every
RESCAN_SECONDS or when this worker's own writes would pass the bound, so it can overshoot
by what the other workers wrote in the last RESCAN_SECONDS.
"""

from __future__ import annotations

import atexit
import base64
import glob
import json
import logging
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gevent.monkey import get_original

_json_string = json.encoder.encode_basestring  # a str as a JSON string (C), non-ASCII kept

log = logging.getLogger("recsql.serve.capture")

_start_thread, _allocate_lock = get_original("_thread", ["start_new_thread", "allocate_lock"])

CSV_TYPES = frozenset({"text/csv"})
JSON_TYPES = frozenset(
    {"application/json", "application/jsonlines", "application/x-jsonlines", "application/jsonl"}
)
DEFAULT_CONTENT_TYPE = "application/octet-stream"  # HTTP's meaning of a body with no type
RESCAN_SECONDS = 10.0
FLUSH_SECONDS = 0.2  # the writer wakes this often, or sooner once the queue is half full
WARN_EVERY_SECONDS = 60.0
CLOSE_WAIT_SECONDS = 5.0
_HOUR_PARTS = 4  # YYYY/MM/DD/HH under <endpoint>/<variant>


@dataclass
class _Pending:
    """A sampled request, as record() took it: raw bytes, encoded later by the writer."""

    variant: str
    inference_id: str | None
    input_data: bytes
    input_type: str | None
    output_data: bytes
    output_type: str | None
    when: float


@dataclass
class _OpenFile:
    path: Path
    hour: str  # YYYY/MM/DD/HH
    fd: int
    size: int
    checked: int  # the writer's batch in which it was last found still linked


class Capture:
    """Writes sampled requests and replies of one endpoint under `directory`.

    One per worker process is enough (variants share it); it is safe to build before a
    fork: each process starts its own writer thread on its first record.
    """

    def __init__(
        self,
        directory: Path,
        endpoint: str,
        sample_percent: float = 100.0,
        max_file_bytes: int = 64 * 2**20,
        max_total_bytes: int = 1024 * 2**20,
        *,
        queue_records: int = 1024,
        queue_bytes: int = 64 * 2**20,
        csv_types: frozenset[str] = CSV_TYPES,
        json_types: frozenset[str] = JSON_TYPES,
    ) -> None:
        if not 0.0 <= sample_percent <= 100.0:
            raise ValueError(f"sample_percent must be 0-100, got {sample_percent}")
        if max_file_bytes < 1 or max_total_bytes < max_file_bytes:
            raise ValueError("need 0 < max_file_bytes <= max_total_bytes")
        _check_name("endpoint", endpoint)
        self.directory = Path(directory)
        self.endpoint = endpoint
        self.sample_percent = float(sample_percent)
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self.queue_records = queue_records
        self.queue_bytes = queue_bytes
        self.csv_types = csv_types
        self.json_types = json_types
        self._pid = -1  # no writer yet: started by the first record in each process

    # ---- the request side: sample, stamp, enqueue; never blocks, never raises ----

    def record(
        self,
        variant: str,
        inference_id: str | None,
        input_data: bytes,
        input_type: str | None,
        output_data: bytes,
        output_type: str | None,
    ) -> None:
        """Queue one request and its reply for writing, if sampled (never raises, never blocks)."""
        try:
            self._own()
            if self.sample_percent < 100.0 and (
                self._random.random() * 100.0 >= self.sample_percent
            ):
                return
            size = len(input_data) + len(output_data)
            with self._state_lock:  # a real lock, held for a few bytecodes by either side
                if (
                    self._closing
                    or len(self._queue) >= self.queue_records
                    or self._queued_bytes + size > self.queue_bytes
                ):
                    self._dropped_full += 1
                    return
                self._queue.append(
                    _Pending(
                        variant,
                        inference_id,
                        bytes(input_data),
                        input_type,
                        bytes(output_data),
                        output_type,
                        time.time(),
                    )
                )
                self._queued_bytes += size
                half_full = (
                    2 * len(self._queue) >= self.queue_records
                    or 2 * self._queued_bytes >= self.queue_bytes
                )
            if half_full:  # else the writer's own FLUSH_SECONDS wake-up drains it
                _release(self._wake)
        except Exception:  # capture must never fail a request
            self._dropped_full += 1
            log.debug("capture record failed", exc_info=True)

    @property
    def dropped(self) -> int:
        """Sampled records not written by this process: queue full or write failed."""
        return self._dropped_full + self._dropped_failed if self._pid == os.getpid() else 0

    @property
    def written(self) -> int:
        """Records this process has written."""
        return self._written if self._pid == os.getpid() else 0

    def close(self) -> None:
        """Write what is queued (waiting up to CLOSE_WAIT_SECONDS) and close the files."""
        if self._pid != os.getpid() or self._closing:
            return
        with self._state_lock:
            self._closing = True
        _release(self._wake)
        if not self._stopped.acquire(True, CLOSE_WAIT_SECONDS):
            log.warning("capture writer did not finish within %.0f s", CLOSE_WAIT_SECONDS)

    def _own(self) -> None:
        """After a fork (or on first use), fresh queue, locks, files and writer thread."""
        if self._pid == os.getpid():
            return
        self._state_lock = _allocate_lock()
        self._write_lock = _allocate_lock()  # held while a record is written
        self._wake = _allocate_lock()
        self._wake.acquire()
        self._stopped = _allocate_lock()
        self._stopped.acquire()
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        self._closing = False
        self._dropped_full = 0
        self._dropped_failed = 0
        self._written = 0
        self._files: dict[str, _OpenFile] = {}
        self._opened = 0
        self._batch = 0
        self._random = random.Random()  # seeded afresh: forked workers must not sample alike
        self._tree_bytes = -1  # unknown until the first scan
        self._scanned_at = 0.0
        self._warned_at = -WARN_EVERY_SECONDS
        self._pid = os.getpid()
        _start_thread(self._run, ())
        atexit.register(self.close)

    # ---- the writer thread ----

    def _run(self) -> None:
        try:
            while True:
                with self._write_lock:  # a batch leaves the queue only to be written
                    with self._state_lock:
                        batch = list(self._queue)
                        self._queue.clear()
                        self._queued_bytes = 0
                        closing = self._closing
                    self._batch += 1  # each open file is checked once a batch (_file_for)
                    for pending in batch:
                        self._write(pending)
                if batch:
                    continue
                if closing:
                    break
                self._wake.acquire(True, FLUSH_SECONDS)
        finally:
            for open_file in self._files.values():
                _close_fd(open_file.fd)
            self._files.clear()
            self._stopped.release()

    def _write(self, pending: _Pending) -> None:
        """Append one record; on any failure drop it, warn (once a minute), start a new file."""
        open_file = None
        try:
            line = self._encode(pending)
            open_file = self._file_for(pending, len(line))
            written = os.write(open_file.fd, line)
            open_file.size += written
            self._tree_bytes += written
            if written != len(line):
                raise OSError(f"short write: {written} of {len(line)} bytes")
            self._written += 1
        except Exception as e:
            self._dropped_failed += 1
            if open_file is not None:  # a torn tail: nothing more goes after it
                self._files.pop(pending.variant, None)
                _close_fd(open_file.fd)
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_SECONDS:
                self._warned_at = now
                log.warning("data capture under %s is dropping records: %s", self.directory, e)
            return
        try:
            self._bound_tree()
        except Exception:
            log.debug("capture size bound failed", exc_info=True)

    def _encode(self, pending: _Pending) -> bytes:
        """The record's line, written out by hand: json.dumps of the same dict costs twice
        as much, and the writer shares the worker's GIL with its requests."""
        metadata = f'"eventId":"{uuid.uuid4()}"'  # made here, off the request's path
        if pending.inference_id is not None:
            metadata += f',"inferenceId":{_json_string(pending.inference_id)}'
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pending.when))
        given = self._payload("INPUT", pending.input_data, pending.input_type)
        answer = self._payload("OUTPUT", pending.output_data, pending.output_type)
        line = (
            f'{{"captureData":{{"endpointInput":{given},"endpointOutput":{answer}}},'
            f'"eventMetadata":{{{metadata},"inferenceTime":"{when}"}},"eventVersion":"0"}}\n'
        )
        return line.encode()

    def _payload(self, mode: str, data: bytes, content_type: str | None) -> str:
        observed = content_type or DEFAULT_CONTENT_TYPE
        media = observed.split(";", 1)[0].strip().lower()
        encoding = "CSV" if media in self.csv_types else "JSON" if media in self.json_types else ""
        text = None
        if encoding:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                encoding = ""
        if text is None:
            encoding, text = "BASE64", base64.b64encode(data).decode("ascii")
        return (
            f'{{"observedContentType":{_json_string(observed)},"mode":"{mode}",'
            f'"data":{_json_string(text)},"encoding":"{encoding}"}}'
        )

    def _file_for(self, pending: _Pending, size: int) -> _OpenFile:
        """This variant's file for the record's hour; a new one past max_file_bytes, at a new
        hour, or when its file was deleted (by the size bound of any worker)."""
        _check_name("variant", pending.variant)
        hour = time.strftime("%Y/%m/%d/%H", time.gmtime(pending.when))
        current = self._files.get(pending.variant)
        if current is not None:
            fits = current.size == 0 or current.size + size <= self.max_file_bytes
            if current.hour == hour and fits and self._still_there(current):
                return current
            del self._files[pending.variant]
            _close_fd(current.fd)
        folder = self.directory / self.endpoint / pending.variant / hour
        stamp = time.strftime("%M-%S", time.gmtime(pending.when))
        millis = int(pending.when * 1000) % 1000
        self._opened += 1  # orders this worker's files opened within one millisecond
        name = f"{stamp}-{millis:03d}-{os.getpid()}-{self._opened:06d}-{uuid.uuid4().hex[:6]}"
        path = folder / f"{name}.jsonl"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        for attempt in (1, 2):  # another worker may remove the emptied hour folder between
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, flags, 0o644)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        opened = _OpenFile(path, hour, fd, 0, self._batch)
        self._files[pending.variant] = opened
        return opened

    def _still_there(self, open_file: _OpenFile) -> bool:
        """False once any worker's size bound deleted the file (checked once a batch)."""
        if open_file.checked != self._batch:
            if os.fstat(open_file.fd).st_nlink == 0:
                return False
            open_file.checked = self._batch
        return True

    def _bound_tree(self) -> None:
        now = time.monotonic()
        if self._tree_bytes <= self.max_total_bytes and now - self._scanned_at < RESCAN_SECONDS:
            return
        self._scanned_at = now
        files = _capture_files(self.directory)
        sizes = []
        for path in files:
            try:
                sizes.append(path.stat().st_size)
            except OSError:
                sizes.append(0)
        total = sum(sizes)
        mine = {f.path for f in self._files.values()}
        for path, size in zip(files, sizes, strict=True):
            if total <= self.max_total_bytes:
                break
            if path in mine:
                continue  # rotates out at max_file_bytes; deleted on a later pass
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # another worker got there first
            total -= size
            _remove_empty_hours(path.parent, self.directory)
        self._tree_bytes = total


def iter_records(
    directory: Path, endpoint: str | None = None, variant: str | None = None
) -> Iterator[dict]:
    """Every complete record under `directory`, oldest file first, each dict as written plus
    "variant". A line without its newline (its writer died mid-write or the disk filled)
    or that is not a JSON object is skipped and counted at DEBUG."""
    skipped = 0
    for path in _capture_files(Path(directory), endpoint, variant):
        try:
            with open(path, "rb") as f:
                for line in f:
                    record = None
                    if line.endswith(b"\n"):
                        try:
                            record = json.loads(line)
                        except ValueError:
                            pass
                    if not isinstance(record, dict) or "captureData" not in record:
                        skipped += 1
                        continue
                    record["variant"] = path.parents[_HOUR_PARTS].name
                    yield record
        except FileNotFoundError:
            continue  # deleted by the size bound while we listed
    if skipped:
        log.debug("skipped %d torn or unparsable capture lines under %s", skipped, directory)


def _capture_files(
    directory: Path, endpoint: str | None = None, variant: str | None = None
) -> list[Path]:
    """The capture files under directory, oldest first: by hour, then file name (which
    starts with the minute, second and millisecond it was opened)."""
    named = [glob.escape(n) if n else "*" for n in (endpoint, variant)]
    pattern = "/".join([*named, "*/*/*/*/*.jsonl"])
    paths = directory.glob(pattern)
    return sorted(paths, key=lambda p: (p.parts[-5:-1], p.name, p.parts[-7:-5]))


def _remove_empty_hours(folder: Path, root: Path) -> None:
    """Remove the emptied hour folder and its emptied day, month and year folders, except
    the current hour's (a writer is about to use it)."""
    now = time.strftime("%Y/%m/%d/%H", time.gmtime())
    for _ in range(_HOUR_PARTS):
        if folder == root or "/".join(folder.parts[-_HOUR_PARTS:]) == now:
            return
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone)
        folder = folder.parent


def _check_name(what: str, name: str) -> None:
    """Endpoint and variant names become folder names: no separators, no dot-only names."""
    if not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"bad {what} name for data capture: {name!r}")


def _release(lock: object) -> None:
    """Wake the writer: release its lock if held (a real lock's release never blocks)."""
    try:
        lock.release()  # type: ignore[attr-defined]
    except RuntimeError:
        pass  # already awake


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
