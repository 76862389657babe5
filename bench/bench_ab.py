"""A/B serving (issue N): what variants, data capture and a shadow cost a request, and how
long `recsql ab-report` takes over what a server captured.

    python bench/bench_ab.py [--users 100000] [--items 20000] [--n 300] [--http-seconds 5]
        [--report-users 20000]

In-process, through DataPlane.invoke: the median of 1 pair, 1,000 pairs of 1,000
distinct users, and a top-10, for one model (`--model-dir`, the baseline), two variants,
two variants with capture on, and one model with capture on. Over HTTP (`python -m serve
--workers 2`, the client one Python process on the same 2 cores, every request timed):
p50/p99 of 1 pair at 8 connections, one model against two variants with capture and a
shadow. Then the report end to end: `--report-users` users each ask for a top-10 of a
two-variant server with capture on (in-process), events are drawn for them (variant b's
users buy 20% more of what they were shown), and `build_report` reads both.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _recsql import random_mfblock, serving  # noqa: E402
from bench_serve import recorded, timed  # noqa: E402

from serve import Invocation, build_dataplane, from_env  # noqa: E402


def median_us(plane, request: Invocation, n: int) -> float:
    return statistics.median(timed(lambda: plane.invoke(request), n, warmup=20)) * 1e6


def in_process(setups: dict[str, dict], users: np.ndarray, items: np.ndarray, n: int) -> None:
    rng = np.random.default_rng(1)
    thousand = rng.choice(users, 1000, replace=False)
    pairs = "".join(f"{u},{p}\n" for u, p in zip(thousand, rng.choice(items, 1000), strict=True))
    requests = {
        "1 pair": Invocation(f"{users[0]},{items[0]}\n".encode(), "text/csv"),
        "1,000 pairs": Invocation(pairs.encode(), "text/csv"),
        "top-10": Invocation(
            json.dumps({"user_id": int(users[1]), "top_k": 10}).encode(), "application/json"
        ),
    }
    print(f"{'in-process, median us':32}" + "".join(f"{k:>14}" for k in requests))
    for label, settings in setups.items():
        plane = build_dataplane(from_env({}, **settings))
        row = [median_us(plane, r, n) for r in requests.values()]
        print(f"{label:32}" + "".join(f"{v:14.1f}" for v in row))
        if plane.capture is not None:
            plane.capture.close()


def over_http(model: Path, variants: dict, tmp: Path, users, items, seconds: float) -> None:
    one = ("POST", "/invocations", f"{users[0]},{items[0]}\n".encode(), "text/csv")
    title = "HTTP, 2 workers, 1 pair, 8 connections"
    print(f"\n{title:40} {'req/s':>6} {'p50 ms':>8} {'p99 ms':>8}")
    env_ab = {
        "RECSQL_VARIANTS": ",".join(f"{k}={v}:1" for k, v in variants.items()),
        "RECSQL_SHADOW": f"s={model}",
        "RECSQL_CAPTURE_DIR": str(tmp / "http-capture"),
    }
    env_capture = {"RECSQL_CAPTURE_DIR": str(tmp / "http-capture-1")}
    cases = (
        ("one model", model, {}),
        ("one model + capture", model, env_capture),
        ("2 variants + capture + shadow", None, env_ab),
    )
    for label, model_dir, env in cases:
        with serving(model_dir, 2, tmp / "serve.log", env=env) as url:
            m = recorded(int(url.rsplit(":", 1)[1]), one, 8, seconds)
            print(f"{label:40} {m['rps']:6,.0f} {m['p50']:8.2f} {m['p99']:8.2f}")


def report(variants: dict, tmp: Path, users: np.ndarray, n_users: int) -> None:
    from abtest.report import build_report

    capture = tmp / "capture"
    settings = {"variants": [f"{k}={v}:1" for k, v in variants.items()], "capture_dir": capture}
    plane = build_dataplane(from_env({}, **settings))
    rng = np.random.default_rng(2)
    who = rng.choice(users, n_users, replace=False)
    shown: dict[int, tuple[str, list[int]]] = {}
    start = time.perf_counter()
    for user in who.tolist():
        body = json.dumps({"user_id": user, "top_k": 10}).encode()
        reply = plane.invoke(Invocation(body, "application/json"))
        ranked = json.loads(reply.body)["predictions"][0]["product_ids"]
        shown[user] = (reply.headers["X-Amzn-Invoked-Production-Variant"], ranked)
    serve_s = time.perf_counter() - start
    plane.capture.close()
    events = tmp / "events.csv"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + 600))
    bought = {"a": 0.10, "b": 0.12}  # b's users buy 20% more of what they were shown
    with open(events, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            "event_time,event_type,product_id,category_id,category_code,brand,price,"
            "user_id,user_session".split(",")
        )
        for user, (variant, ranked) in shown.items():
            for product in ranked:
                if rng.random() < 0.3:
                    out.writerow([when, "view", product, 1, "", "", "9.99", user, "s"])
                if rng.random() < bought[variant]:
                    out.writerow([when, "purchase", product, 1, "", "", "9.99", user, "s"])
    start = time.perf_counter()
    result = build_report(capture, event_files=[events])
    report_s = time.perf_counter() - start
    files = list(capture.rglob("*.jsonl"))
    size = sum(f.stat().st_size for f in files)
    print(
        f"\nreport: {n_users:,} top-10 requests captured in {serve_s:.1f} s ({len(files)} files,"
        f" {size / 2**20:.1f} MiB); ab-report {report_s:.2f} s; verdict: {result.verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--n", type=int, default=300, help="timed calls per case")
    parser.add_argument("--http-seconds", type=float, default=5, help="0: no HTTP figures")
    parser.add_argument("--report-users", type=int, default=20_000, help="0: no report")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        users = np.arange(args.users, dtype=np.int64) * 13 + 500_000_000
        items = np.arange(args.items, dtype=np.int64) * 7 + 1_000_000
        variants = {
            name: random_mfblock(tmp / name, users, items, seed=seed, probability=True)
            for seed, name in enumerate(("a", "b"))
        }
        spec = [f"{k}={v}:1" for k, v in variants.items()]
        print(f"two softmax MFBlock models: {args.users:,} users, {args.items:,} items, 64 dims")
        in_process(
            {
                "one model (baseline)": {"model_dir": variants["a"]},
                "2 variants": {"variants": spec},
                "2 variants + capture": {"variants": spec, "capture_dir": tmp / "c1"},
                "one model + capture": {"model_dir": variants["a"], "capture_dir": tmp / "c2"},
            },
            users,
            items,
            args.n,
        )
        if args.http_seconds:
            over_http(variants["a"], variants, tmp, users, items, args.http_seconds)
        if args.report_users:
            report(variants, tmp, users, args.report_users)


if __name__ == "__main__":
    main()
