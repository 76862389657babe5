"""The server's log line and gc.freeze: what each costs a worker.

    python bench/bench_logs.py [--quick]

- Request line: the per-invocation INFO line, formatted and written (to /dev/null) the
  way the server logs it, in interleaved rounds of one run: before issue O (basicConfig's
  format, the process look-up off, the pid passed in the message) and now (serve/logs.py,
  text and json). Microseconds per line.
- gc.freeze: a master loads the model and the app as `recsql serve` does, then forks
  "workers". In each, the first full collection (its pause, and the memory it un-shares
  from the master: private dirty KiB) and the full collections during single-pair requests
  through the handler, with and without `gc.freeze()` before the fork.

Model: random MFBlock weights, 64 dimensions, 100,000 users, 200,000 products (quick: 10,000
users). Prints a markdown section; figures are medians of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _recsql import random_mfblock  # noqa: E402

from serve import Invocation, build_dataplane, create_app, from_env, logs  # noqa: E402

BEFORE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BEFORE_LINE = "invocations model=%s status=%d rows=%d null=%d ms=%.2f inference_id=%s pid=%d"
LINE = "invocations model=%s status=%d rows=%d null=%d ms=%.2f inference_id=%s"
log = logging.getLogger("recsql.serve")


def _before(devnull: object) -> Callable[[], None]:
    logging.basicConfig(force=True, stream=devnull, format=BEFORE_FORMAT, level="INFO")
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    return lambda: log.info(BEFORE_LINE, "model", 200, 1, 0, 0.4321, "-", os.getpid())


def _now(devnull: object, log_format: str) -> Callable[[], None]:
    with contextlib.redirect_stderr(devnull):  # type: ignore[type-var]
        logs.configure("INFO", log_format)
    return lambda: log.info(LINE, "model", 200, 1, 0, 0.4321, "-")


def request_line(quick: bool) -> list[str]:
    lines, rounds = (5_000, 5) if quick else (20_000, 9)
    variants = {
        "before (no process look-up, pid in the message)": _before,
        "now, text (pid from the record)": lambda d: _now(d, "text"),
        "now, json": lambda d: _now(d, "json"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with open(os.devnull, "w") as devnull:
        for _ in range(rounds):
            for name, setup in variants.items():
                emit = setup(devnull)
                start = time.perf_counter()
                for _ in range(lines):
                    emit()
                times[name].append((time.perf_counter() - start) / lines * 1e6)
    logging.basicConfig(force=True, level="WARNING")
    out = ["| request log line | us per line (median) | rounds |", "|---|---:|---|"]
    for name, values in times.items():
        spread = ", ".join(f"{v:.1f}" for v in values)
        out.append(f"| {name} | {statistics.median(values):.2f} | {spread} |")
    return out


def _private_dirty_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    return 0


def _worker(plane, request: Invocation, requests: int, freeze: bool) -> dict[str, float]:
    """In a forked child: the first full collection, then `requests` requests."""
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        with os.fdopen(read) as pipe:
            result = json.loads(pipe.read())
        os.waitpid(pid, 0)
        return result
    os.close(read)
    try:
        if freeze:
            gc.freeze()
        dirty = _private_dirty_kib()
        start = time.perf_counter()
        gc.collect()
        result = {
            "first_ms": (time.perf_counter() - start) * 1e3,
            "first_kib": _private_dirty_kib() - dirty,
        }
        pauses: list[float] = []

        def watch(phase: str, info: dict) -> None:
            if info["generation"] == 2 and phase == "start":
                pauses.append(-time.perf_counter())
            elif info["generation"] == 2:
                pauses[-1] += time.perf_counter()

        gc.callbacks.append(watch)
        for _ in range(requests):
            plane.invoke(request)
        gc.callbacks.remove(watch)
        result["full"] = len(pauses)
        result["full_ms"] = sum(pauses) * 1e3
        os.write(write, json.dumps(result).encode())
    finally:
        os._exit(0)


def freeze_effect(quick: bool) -> list[str]:
    users, items = (10_000, 200_000) if quick else (100_000, 200_000)
    requests, rounds = (5_000, 3) if quick else (50_000, 5)
    with tempfile.TemporaryDirectory() as tmp:
        user_ids = np.arange(users, dtype=np.int64) * 13 + 500_000_000
        item_ids = np.arange(items, dtype=np.int64) * 7 + 1_000_000
        model_dir = random_mfblock(Path(tmp) / "model", user_ids, item_ids)
        plane = build_dataplane(from_env({}, model_dir=model_dir))
        create_app(plane)  # imports and builds what a worker holds
        body = f"{user_ids[0]},{item_ids[0]}\n".encode()
        request = Invocation(body, "text/csv", "text/csv")
        tracked = len(gc.get_objects())
        found: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(rounds):
            for freeze in (False, True):
                found[freeze].append(_worker(plane, request, requests, freeze))
    out = [
        f"A master holding {tracked:,} tracked objects; each worker: one full collection,"
        f" then {requests:,} single-pair requests through the handler.",
        "",
        "| worker | first full pass ms | memory it un-shares KiB | full passes in the requests"
        " | their ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for freeze, label in ((False, "without gc.freeze"), (True, "with gc.freeze (the server)")):
        med = {k: statistics.median(r[k] for r in found[freeze]) for k in found[freeze][0]}
        out.append(
            f"| {label} | {med['first_ms']:.1f} | {med['first_kib']:,.0f} | {med['full']:.0f}"
            f" | {med['full_ms']:.1f} |"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer lines, smaller model")
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    sections = ["## Server log and gc.freeze (bench/bench_logs.py)", ""]
    sections += [*request_line(args.quick), ""]
    sections += freeze_effect(args.quick)
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
