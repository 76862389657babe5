"""Inference server speed: in-process handler, HTTP requests/s, top-K.

    python bench/bench_serve.py [--quick] [--workers 2] [--seconds 10]

- In-process: decode + predict + encode of Aurora-shaped CSV (1 / 1,000 /
  10,000 pairs) through the plain handler `DataPlane.invoke`. Targets:
  <= 0.2 ms for 1 pair, <= 1 ms for 1,000 (the seed's hosting code took
  15-17 ms and 17-21 ms).
- HTTP: a recording client (one Python process driving N keep-alive connections,
  every request timed, so the percentiles hold no estimated samples) against
  `python -m serve --workers N` (gevent): `/ping` as the same-run baseline, 1 pair
  at 1 and 8 connections, 1,000 pairs at 4, top-10 at 1 and 8; then 1 pair at 8
  with the INFO line per request on (its cost; the busiest worker's share of the
  requests). Targets: p99 <= 3x p50; no worker above 65%. The clients share the
  machine's 2 cores with the server: compare each row with `/ping`. Then /ping, 1 pair
  and 1,000 pairs again with the server (1 worker) on core 0 and the client on core 1
  (taskset), where neither waits for the other's time slice.
- Top-K: best 10 of 200,000 products for one user. Target: <= 5 ms. Beside
  implicit's `recommend` on the same factors (200k and 2M items), interleaved.

Model: random MFBlock weights, 64 dimensions, 200,000 products, 100,000 users.
Prints a markdown section; figures are medians of repeated runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _recsql import random_mfblock, serving  # noqa: E402

from serve import Invocation, build_dataplane, from_env  # noqa: E402


def make_model(
    folder: Path, users: int, items: int, emb: int = 64
) -> tuple[Path, np.ndarray, np.ndarray]:
    user_ids = np.arange(users, dtype=np.int64) * 13 + 500_000_000
    item_ids = np.arange(items, dtype=np.int64) * 7 + 1_000_000
    return random_mfblock(folder, user_ids, item_ids, emb), user_ids, item_ids


def csv_body(user_ids: np.ndarray, item_ids: np.ndarray, n: int) -> bytes:
    rng = np.random.default_rng(n)
    u, p = rng.choice(user_ids, n), rng.choice(item_ids, n)
    return "".join(f"{a},{b}\n" for a, b in zip(u.tolist(), p.tolist(), strict=True)).encode()


def timed(fn, repeat: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeat` calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def in_process(model_dir: Path, user_ids, item_ids, quick: bool) -> list[str]:
    plane = build_dataplane(from_env({}, model_dir=model_dir))
    rows = ["| pairs | median ms | p99 ms | rows/s |", "|---:|---:|---:|---:|"]
    for n in (1, 1_000, 10_000):
        request = Invocation(csv_body(user_ids, item_ids, n), "text/csv", "text/csv")
        repeat = {1: 2000, 1_000: 500, 10_000: 100}[n] // (10 if quick else 1)
        times = sorted(timed(lambda r=request: plane.invoke(r), repeat))
        med, p99 = statistics.median(times), times[int(len(times) * 0.99) - 1]
        rows.append(f"| {n:,} | {med * 1e3:.3f} | {p99 * 1e3:.3f} | {n / med:,.0f} |")
    return rows


def top_k(model_dir: Path, user_ids, quick: bool) -> list[str]:
    plane = build_dataplane(from_env({}, model_dir=model_dir))
    rec = plane.registry.default.recommender
    users = user_ids[:: max(1, len(user_ids) // (50 if quick else 500))]
    direct = sorted(t for u in users.tolist() for t in timed(lambda u=u: rec.top_k(u, 10), 1))
    bodies = [json.dumps({"user_id": u, "top_k": 10}).encode() for u in users.tolist()]
    handler = sorted(
        t
        for b in bodies
        for t in timed(lambda b=b: plane.invoke(Invocation(b, "application/json")), 1)
    )
    out = ["| top-10 of 200,000 products | median ms | p99 ms |", "|---|---:|---:|"]
    for name, times in (("Recommender.top_k", direct), ("handler (JSON in/out)", handler)):
        p99 = times[max(0, int(len(times) * 0.99) - 1)]
        out.append(f"| {name} | {statistics.median(times) * 1e3:.3f} | {p99 * 1e3:.3f} |")
    return out


def top_k_vs_implicit(quick: bool) -> list[str]:
    """Recommender.top_k beside implicit's `recommend` on the same factors, interleaved user
    by user (implicit is a bench extra: `pip install implicit`); top-10 ids compared."""
    try:
        from implicit.cpu.als import AlternatingLeastSquares
    except ImportError:
        return ["(implicit not installed: `make bench` installs it; top-K comparison skipped)"]
    from model.recommender import IdIndex, Recommender

    out = [
        "| top-10 of | recsql Recommender.top_k ms | implicit recommend ms | ratio | same ids |",
        "|---:|---:|---:|---:|---:|",
    ]
    rng = np.random.default_rng(0)
    for n_items in (200_000, 2_000_000):
        n_users = 1_000
        uv = np.maximum(rng.normal(size=(n_users, 64)), 0).astype(np.float32)
        iv = np.maximum(rng.normal(size=(n_items, 64)), 0).astype(np.float32)
        rec = Recommender(uv, iv, IdIndex(np.arange(n_users)), IdIndex(np.arange(n_items)))
        als = AlternatingLeastSquares(factors=64)
        als.user_factors, als.item_factors = uv, iv
        ours, theirs, same = [], [], 0
        users = range(0, n_users, 20 if quick else 5)
        for u in users:
            t = time.perf_counter()
            a, _ = rec.top_k(u, 10)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            b, _ = als.recommend(u, None, N=10, filter_already_liked_items=False)
            theirs.append(time.perf_counter() - t)
            same += int(np.array_equal(a, b))
        mo, mt = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
        out.append(f"| {n_items:,} | {mo:.3f} | {mt:.3f} | {mt / mo:.2f}x | {same}/{len(users)} |")
    return out


def _http_request(port: int, method: str, path: str, body: bytes, content_type: str) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def _complete(buffer: bytes) -> int:
    """Length of the first whole response in `buffer` (0: not all there yet)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buffer[:end].lower()
    if not head.startswith(b"http/1.1 200"):
        raise RuntimeError(f"server answered {buffer[:60]!r}")
    length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
    return end + 4 + length if len(buffer) >= end + 4 + length else 0


def recorded(port: int, request: tuple, connections: int, seconds: float) -> dict[str, float]:
    """`connections` keep-alive connections, each with one request in flight, driven by one
    client process (fewer processes competing with the server than one per connection);
    every request timed, so the percentiles hold no estimated samples."""
    raw = _http_request(port, *request)
    selector = selectors.DefaultSelector()
    started, buffers, times = {}, {}, []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
        started[sock] = time.perf_counter()
        sock.sendall(raw)
    until = time.perf_counter() + seconds
    while started:
        for key, _ in selector.select():
            sock = key.fileobj
            buffers[sock] += sock.recv(1 << 20)
            size = _complete(buffers[sock])
            if not size:
                continue
            now = time.perf_counter()
            times.append(now - started[sock])
            buffers[sock] = buffers[sock][size:]
            if now < until:
                started[sock] = time.perf_counter()
                sock.sendall(raw)
            else:
                del started[sock]
                selector.unregister(sock)
                sock.close()
    times = np.sort(np.asarray(times)) * 1e3
    p50, p99 = float(np.percentile(times, 50)), float(np.percentile(times, 99))
    return {"rps": len(times) / seconds, "p50": p50, "p99": p99, "max": float(times[-1])}


def _row(label: str, connections: int, m: dict[str, float], note: str = "") -> str:
    return (
        f"| {label} | {connections} | {m['rps']:,.0f} | {m['p50']:.2f} | {m['p99']:.2f} |"
        f" {m['p99'] / m['p50']:.1f} | {m['max']:.1f} |{note}"
    )


def _worker_shares(log: Path) -> str:
    pids = re.findall(r"\[(\d+)\] recsql.serve: invocations ", log.read_text(errors="replace"))
    counts = sorted((pids.count(p) for p in set(pids)), reverse=True)
    return f" busiest worker {counts[0] / max(len(pids), 1):.0%}" if counts else ""


def http_bench(model_dir: Path, user_ids, item_ids, workers: int, seconds: int) -> list[str]:
    """Every request recorded; `/ping` on the same server is the baseline of each run."""
    one = ("POST", "/invocations", csv_body(user_ids, item_ids, 1), "text/csv")
    thousand = ("POST", "/invocations", csv_body(user_ids, item_ids, 1_000), "text/csv")
    top = json.dumps({"user_id": int(user_ids[0]), "top_k": 10}).encode()
    top10 = ("POST", "/invocations", top, "application/json")
    ping = ("GET", "/ping", b"", "")
    rows = [
        f"{workers} gevent workers, keep-alive; client: one Python process driving every"
        " connection (one request in flight on each), every request recorded, on the same"
        " 2 cores.",
        "",
        "| request | connections | requests/s | p50 ms | p99 ms | p99/p50 | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        with serving(model_dir, workers, Path(tmp) / "server.log") as url:
            port = urlsplit(url).port
            for label, request, connections in (
                ("GET /ping (baseline)", ping, 8),
                ("1 pair, CSV", one, 1),
                ("1 pair, CSV", one, 8),
                ("1,000 pairs, CSV", thousand, 4),
                ("top-10 of 200,000, JSON", top10, 1),
                ("top-10 of 200,000, JSON", top10, 8),
            ):
                rows.append(_row(label, connections, recorded(port, request, connections, seconds)))
        log = Path(tmp) / "info.log"
        with serving(model_dir, workers, log, log_level="INFO") as url:
            m = recorded(urlsplit(url).port, one, 8, seconds)
            rows.append(_row("1 pair, CSV, INFO line per request", 8, m, _worker_shares(log)))
    return rows


def pinned_bench(model_dir: Path, user_ids, item_ids, seconds: int) -> list[str]:
    """The same client and requests with the server (1 worker) on core 0 and the client on
    core 1, so that neither waits for the other's time slice: what is left of the tail is
    the server's own."""
    one = ("POST", "/invocations", csv_body(user_ids, item_ids, 1), "text/csv")
    thousand = ("POST", "/invocations", csv_body(user_ids, item_ids, 1_000), "text/csv")
    rows = [
        "The same client pinned to core 1 and the server, 1 worker, pinned to core 0"
        " (taskset): no process waits for another's time slice.",
        "",
        "| request | connections | requests/s | p50 ms | p99 ms | p99/p50 | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    before = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory() as tmp:
        with serving(model_dir, 1, Path(tmp) / "server.log", cpus="0") as url:
            port = urlsplit(url).port
            os.sched_setaffinity(0, {1})
            try:
                for label, request, connections in (
                    ("GET /ping (baseline)", ("GET", "/ping", b"", ""), 8),
                    ("1 pair, CSV", one, 8),
                    ("1,000 pairs, CSV", thousand, 4),
                ):
                    m = recorded(port, request, connections, seconds)
                    rows.append(_row(label, connections, m))
            finally:
                os.sched_setaffinity(0, before)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model, short runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10, help="per HTTP measurement")
    args = parser.parse_args()
    users, items = (10_000, 200_000) if args.quick else (100_000, 200_000)
    seconds = 2 if args.quick else args.seconds
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, user_ids, item_ids = make_model(Path(tmp) / "model", users, items)
        sections = ["## Inference server (bench/bench_serve.py)", ""]
        sections += [
            "In-process handler (CSV in, CSV out):",
            "",
            *in_process(model_dir, user_ids, item_ids, args.quick),
            "",
        ]
        sections += [*top_k(model_dir, user_ids, args.quick), ""]
        sections += [*top_k_vs_implicit(args.quick), ""]
        sections += http_bench(model_dir, user_ids, item_ids, args.workers, seconds)
        if len(os.sched_getaffinity(0)) >= 2:
            sections += ["", *pinned_bench(model_dir, user_ids, item_ids, seconds)]
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
