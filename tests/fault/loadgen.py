"""A small load generator and process helpers for fault tests and bench/soak.py.

`LoadRun` runs client threads, each with one keep-alive `http.client`
connection, sending a rotating list of requests until a request count or a
deadline is reached. Nothing is retried: a request that fails (connection
error, truncated reply, unexpected status or body) is counted as failed with
the time it failed; the thread opens a new connection for its next request.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

Check = Callable[[int, bytes], bool]


def ok_2xx(status: int, body: bytes) -> bool:
    return 200 <= status < 300


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    check: Check = ok_2xx  # does this reply count as a success?
    kind: str = "request"  # label for per-kind counts


@dataclass(frozen=True)
class Failure:
    at: float  # time.monotonic() when the request failed
    kind: str  # request kind
    reason: str  # "HTTP 503", "RemoteDisconnected", "ConnectionRefusedError", "bad body", ...


@dataclass
class LoadResult:
    ok: int = 0
    ok_times: list[float] = field(default_factory=list)  # time.monotonic() of each success
    failures: list[Failure] = field(default_factory=list)
    by_kind: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    @property
    def failure_rate(self) -> float:
        return len(self.failures) / self.total if self.total else 0.0

    def reasons(self) -> Counter[str]:
        return Counter(f.reason for f in self.failures)

    def summary(self) -> str:
        rate = self.total / self.seconds if self.seconds else 0.0
        return (
            f"{self.total} requests in {self.seconds:.1f} s ({rate:.0f}/s): {self.ok} ok, "
            f"{len(self.failures)} failed {dict(self.reasons())}"
        )


class LoadRun:
    """`with LoadRun(url, requests, threads=4, total=5000) as run: ...; result = run.join()`."""

    def __init__(
        self,
        url: str,
        requests: Sequence[Request],
        *,
        threads: int = 4,
        total: int | None = None,
        seconds: float | None = None,
        timeout: float = 30.0,
    ) -> None:
        if total is None and seconds is None:
            raise ValueError("give total= or seconds= to bound the run")
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.requests = list(requests)
        self.total, self.seconds, self.timeout = total, seconds, timeout
        self.result = LoadResult()
        self._claimed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)
        ]
        self._start = 0.0

    def __enter__(self) -> LoadRun:
        self._start = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.join()

    def done(self) -> int:
        with self._lock:
            return self.result.total

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Block until `count` requests have completed (or the run ended)."""
        deadline = time.monotonic() + timeout
        while self.done() < count and any(t.is_alive() for t in self._threads):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.done()} of {count} requests in {timeout} s")
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 120.0) -> LoadResult:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise TimeoutError("load threads did not finish")
        self.result.seconds = time.monotonic() - self._start
        return self.result

    def _claim(self) -> int | None:
        """The next request number, or None when the run is over."""
        if self._stop.is_set():
            return None
        if self.seconds is not None and time.monotonic() - self._start >= self.seconds:
            return None
        with self._lock:
            if self.total is not None and self._claimed >= self.total:
                return None
            self._claimed += 1
            return self._claimed - 1

    def _record(self, request: Request, reason: str | None) -> None:
        with self._lock:
            self.result.by_kind[request.kind] += 1
            if reason is None:
                self.result.ok += 1
                self.result.ok_times.append(time.monotonic())
            else:
                self.result.failures.append(Failure(time.monotonic(), request.kind, reason))

    def _client(self, index: int) -> None:
        conn: http.client.HTTPConnection | None = None
        while (number := self._claim()) is not None:
            request = self.requests[(number + index) % len(self.requests)]
            reason: str | None = None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                conn.request(request.method, request.path, request.body, request.headers)
                response = conn.getresponse()
                body = response.read()
                if response.will_close:
                    conn.close()
                    conn = None
                if not request.check(response.status, body):
                    reason = f"HTTP {response.status}" if response.status >= 300 else "bad body"
            except (OSError, http.client.HTTPException) as exc:
                reason = type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)  # no busy loop against a server that is gone
            self._record(request, reason)
        if conn is not None:
            conn.close()


# ---------------------------------------------------------------- processes


def children(pid: int) -> list[int]:
    """Direct children of a process (gunicorn workers of a master), from /proc."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def rss_kb(pid: int) -> int:
    """Resident set size (VmRSS) of one process in kB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(master: int) -> dict[int, int]:
    """pid -> VmRSS in kB for a gunicorn master and its workers."""
    return {pid: rss_kb(pid) for pid in [master, *children(master)]}


def wait_for_workers(
    master: int, count: int, gone: Sequence[int] = (), timeout: float = 30
) -> list[int]:
    """Wait until the master has `count` workers, none of them in `gone`; returns their pids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = children(master)
        if len(now) == count and not set(now) & set(gone):
            return now
        time.sleep(0.05)
    raise AssertionError(f"expected {count} workers (not {list(gone)}), have {children(master)}")
