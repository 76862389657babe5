"""Inference server speed: in-process handler, HTTP requests/s, top-K.

    python bench/bench_serve.py [--quick] [--workers 2] [--seconds 10]

- In-process: decode + predict + encode of Aurora-shaped CSV (1 / 1,000 /
  10,000 pairs) through the plain handler `DataPlane.invoke`. Targets:
  <= 0.2 ms for 1 pair, <= 1 ms for 1,000 (the seed's hosting code took
  15-17 ms and 17-21 ms).
- HTTP: single-pair POST /invocations over keep-alive connections against
  `python -m serve --workers N` (gevent), with `wrk` when installed, else a
  Python http.client loop in several processes. Target: >= 4,000 requests/s
  on 2 cores. The client shares the machine's cores with the server.
- Top-K: best 10 of 200,000 products for one user. Target: <= 5 ms.

Model: random MFBlock weights, 64 dimensions, 200,000 products, 100,000 users.
Prints a markdown section; figures are medians of repeated runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import re
import shutil
import statistics
import subprocess
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


def timed(fn, repeat: int) -> list[float]:
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


def _wrk(port: int, body: bytes, connections: int, seconds: int) -> tuple[float, float, float]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "text/csv"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
    )
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/invocations",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script.unlink()

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, ms("50"), ms("99")


def _client(args: tuple[int, bytes, float]) -> list[float]:
    port, body, until = args
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "text/csv"}
    out = []
    while time.monotonic() < until:
        start = time.perf_counter()
        conn.request("POST", "/invocations", body, headers)
        response = conn.getresponse()
        response.read()
        out.append(time.perf_counter() - start)
    return out


def _python_client(port: int, body: bytes, connections: int, seconds: int):
    until = time.monotonic() + seconds
    with multiprocessing.Pool(connections) as pool:
        times = sorted(
            t for part in pool.map(_client, [(port, body, until)] * connections) for t in part
        )
    return len(times) / seconds, times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3


def http_bench(model_dir: Path, user_ids, item_ids, workers: int, seconds: int) -> list[str]:
    body = csv_body(user_ids, item_ids, 1)
    tool = "wrk" if shutil.which("wrk") else "python http.client"
    with tempfile.TemporaryDirectory() as tmp:
        with serving(model_dir, workers, Path(tmp) / "server.log") as url:
            port = urlsplit(url).port
            rows = [
                f"Single-pair POST /invocations, {workers} gevent workers, keep-alive,"
                f" client: {tool}",
                "",
                "| connections | requests/s | p50 ms | p99 ms |",
                "|---:|---:|---:|---:|",
            ]
            for connections in (1, 8, 32):
                run = _wrk if tool == "wrk" else _python_client
                rps, p50, p99 = run(port, body, connections, seconds)
                rows.append(f"| {connections} | {rps:,.0f} | {p50:.2f} | {p99:.2f} |")
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
        sections += http_bench(model_dir, user_ids, item_ids, args.workers, seconds)
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
