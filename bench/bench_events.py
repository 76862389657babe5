"""Fresh events (serve/events.py): what they cost the request path, how fast they are taken,
and what Redis spends per user.

    python bench/bench_events.py [--items 20000] [--users 2000] [--redis redis://127.0.0.1:6379/0]
        [--memory-users 100000] [--memory-events 20]

In-process, through DataPlane.invoke (decode -> predict -> encode, no HTTP): the median
and p90 latency of a one-pair score and a top-10 for a known user, with the store off, on
SQLite and on Redis, for a user without and with fresh events; events taken per second
(requests of 100 events, 10 users); Redis memory per user (INFO used_memory before and
after `--memory-users` users of `--memory-events` events, under a key prefix of its own,
deleted after).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _recsql import random_history_model  # noqa: E402

from serve import Invocation, build_dataplane, from_env  # noqa: E402
from serve.events import EVENT, EventBatch, RedisStore  # noqa: E402

EMB, KEEP = 64, 200


def timed(plane, body: bytes, content_type: str, n: int) -> tuple[float, float]:
    request = Invocation(body, content_type)
    for _ in range(20):
        plane.invoke(request)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        plane.invoke(request)
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times) * 1e3, times[int(0.9 * len(times))] * 1e3


def latency(model_dir: Path, tmp: Path, stores: dict[str, dict], n: int) -> None:
    print(f"{'store':8} {'user':14} {'pair p50/p90 ms':>18} {'top-10 p50/p90 ms':>20}")
    for name, settings in stores.items():
        plane = build_dataplane(from_env({}, model_dir=model_dir, state_dir=tmp, **settings))
        cases = [("no events", 7)]
        if name != "off":
            fresh = [
                {"user_id": 8, "product_id": 1_000_000 + p, "event_type": "view"} for p in range(5)
            ]
            plane.invoke(Invocation(json.dumps({"events": fresh}).encode(), "application/json"))
            cases.append(("5 fresh", 8))
        for label, user in cases:
            pair = timed(plane, f"{user},1000003\n".encode(), "text/csv", n)
            top = json.dumps({"user_id": [user], "top_k": 10}).encode()
            ranked = timed(plane, top, "application/json", n)
            print(
                f"{name:8} {label:14} {pair[0]:8.3f} / {pair[1]:6.3f}"
                f"   {ranked[0]:8.3f} / {ranked[1]:6.3f}"
            )
        plane.events.close()


def intake(model_dir: Path, tmp: Path, stores: dict[str, dict], requests: int) -> None:
    for name, settings in stores.items():
        if name == "off":
            continue
        plane = build_dataplane(from_env({}, model_dir=model_dir, state_dir=tmp, **settings))
        bodies = [
            json.dumps(
                {
                    "events": [
                        {"user_id": 100_000 + r * 10 + u, "product_id": 1_000_000 + e}
                        for u in range(10)
                        for e in range(10)
                    ]
                }
            ).encode()
            for r in range(requests)
        ]
        start = time.perf_counter()
        for body in bodies:
            plane.invoke(Invocation(body, "application/json"))
        seconds = time.perf_counter() - start
        print(
            f"{name:8} took {requests * 100 / seconds:,.0f} events/s in-process"
            f" ({seconds / requests * 1e3:.2f} ms per request of 100 events, 10 users)"
        )
        plane.events.close()


def redis_memory(url: str, users: int, events: int) -> None:
    prefix = f"recsql-bench:{uuid.uuid4().hex}:"
    store = RedisStore(url, KEEP, 3600, prefix)
    client = store.client
    client.memory_purge() if hasattr(client, "memory_purge") else None
    before = client.info("memory")["used_memory"]
    rng = np.random.default_rng(0)
    try:
        for start in range(0, users, 1000):
            who = np.repeat(np.arange(start, min(start + 1000, users)), events)
            packed = np.empty(len(who), EVENT)
            packed["product_id"] = rng.integers(1_000_000, 1_200_000, len(who))
            packed["event_time"] = 1_700_000_000 + np.arange(len(who))
            packed["event_type"] = rng.choice(4, len(who))
            store.append(EventBatch(who.astype(np.int64) + 10**12, packed))
        after = client.info("memory")["used_memory"]
        sample = client.memory_usage(f"{prefix}{10**12}", samples=0)
        per_user = (after - before) / users
        print(
            f"redis: {users:,} users x {events} events: {after - before:,} bytes"
            f" ({per_user:,.0f} per user, MEMORY USAGE of one key {sample}) ="
            f" {per_user * 1e6 / 2**30:.2f} GiB per million users"
        )
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=10_000))
        for at in range(0, len(keys), 10_000):
            client.delete(*keys[at : at + 10_000])
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=300, help="timed calls per case")
    parser.add_argument("--memory-users", type=int, default=100_000)
    parser.add_argument("--memory-events", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = random_history_model(
            tmp / "model",
            np.arange(args.users, dtype=np.int64) + 1,
            np.arange(args.items, dtype=np.int64) + 1_000_000,
            keep=KEEP,
            emb=EMB,
        )
        prefix = f"recsql-bench:{uuid.uuid4().hex}:"
        stores = {
            "off": {"events_url": "off"},
            "sqlite": {"events_url": f"sqlite://{tmp / 'events.sqlite'}"},
            "redis": {"events_url": args.redis, "events_prefix": prefix},
        }
        print(f"history model: {args.users:,} users, {args.items:,} items, {EMB} dims")
        latency(model_dir, tmp, stores, args.n)
        intake(model_dir, tmp, stores, 50)
        if args.memory_users:
            for events in sorted({args.memory_events, KEEP}):
                users = args.memory_users if events == args.memory_events else 10_000
                redis_memory(args.redis, users, events)
        import redis

        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=prefix + "*", count=10_000))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    main()
