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

Over HTTP (`--http-seconds`, 0 skips it): `python -m serve --workers 2` on each store, the
client one Python process on the same 2 cores (bench_serve.recorded: every request timed):
p50/p99 of a top-10 for a user without and with 5 fresh events; events taken per second
in requests of 10 (PutEvents' largest batch) and 100 events; and the delay from an
event's 200 to a changed score on the server's other connections (4 keep-alive
connections, which the server spreads over its workers), for the first event into an
empty store and for later ones.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _recsql import random_history_model, serving  # noqa: E402
from bench_serve import recorded, timed  # noqa: E402

from serve import Invocation, build_dataplane, from_env  # noqa: E402
from serve.events import EVENT, EventBatch, RedisStore  # noqa: E402

EMB, KEEP = 64, 200


def p50_p90(plane, body: bytes, content_type: str, n: int) -> tuple[float, float]:
    request = Invocation(body, content_type)
    times = sorted(timed(lambda: plane.invoke(request), n, warmup=20))
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
            pair = p50_p90(plane, f"{user},1000003\n".encode(), "text/csv", n)
            top = json.dumps({"user_id": [user], "top_k": 10}).encode()
            ranked = p50_p90(plane, top, "application/json", n)
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


def events_body(first_user: int, users: int, per_user: int) -> bytes:
    return json.dumps(
        {
            "events": [
                {"user_id": first_user + u, "product_id": 1_000_000 + e, "event_type": "view"}
                for u in range(users)
                for e in range(per_user)
            ]
        }
    ).encode()


def _post(conn: http.client.HTTPConnection, body: bytes, content_type: str) -> bytes:
    conn.request("POST", "/invocations", body, {"Content-Type": content_type})
    reply = conn.getresponse()
    data = reply.read()
    if reply.status != 200:
        raise RuntimeError(f"{reply.status}: {data[:200]!r}")
    return data


def delays(port: int, rounds: int) -> list[float]:
    """Seconds from an event's 200 to the moment 4 other connections all see a changed pair
    score; the first round's store is empty."""
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(5)]
    out = []
    for r in range(rounds):
        user, product = 9 + r, 1_000_100 + r  # known users, a product they never touched
        pair = f"{user},{product}\n".encode()
        before = [_post(c, pair, "text/csv") for c in conns[1:]]
        event = {"user_id": user, "product_id": product, "event_type": "purchase"}
        _post(conns[0], json.dumps({"events": [event]}).encode(), "application/json")
        start = time.perf_counter()
        waiting = set(range(4))
        while waiting:
            for i in list(waiting):
                if _post(conns[1 + i], pair, "text/csv") != before[i]:
                    waiting.discard(i)
            if time.perf_counter() - start > 5:
                raise RuntimeError(f"score of {user} unchanged 5 s after the event")
        out.append(time.perf_counter() - start)
    for c in conns:
        c.close()
    return out


def over_http(model_dir: Path, tmp: Path, redis_url: str, seconds: float) -> None:
    stores = {  # new ones: the first delay is the one into an empty store
        "off": {"events_url": "off"},
        "sqlite": {"events_url": f"sqlite://{tmp / 'http.sqlite'}"},
        "redis": {"events_url": redis_url, "events_prefix": f"recsql-bench:{uuid.uuid4().hex}:"},
    }
    top = json.dumps({"user_id": [7], "top_k": 10}).encode()
    top_fresh = json.dumps({"user_id": [8], "top_k": 10}).encode()
    print("\nHTTP, 2 workers; the client shares the 2 cores")
    print(f"{'store':8} {'request':34} {'conns':>5} {'req/s':>8} {'events/s':>9} p50/p99 ms")
    for name, settings in stores.items():
        env = {"RECSQL_EVENTS_URL": settings["events_url"]}
        if "events_prefix" in settings:
            env["RECSQL_EVENTS_PREFIX"] = settings["events_prefix"]
        with serving(model_dir, 2, tmp / f"serve-{name}.log", env=env) as url:
            port = int(url.rsplit(":", 1)[1])
            cases = [("top-10, no fresh events", top, 0, 1), ("top-10, no fresh events", top, 0, 8)]
            if name != "off":
                lag = delays(port, 21)
                conn = http.client.HTTPConnection("127.0.0.1", port)
                _post(conn, events_body(8, 1, 5), "application/json")
                conn.close()
                cases += [
                    ("top-10, 5 fresh events", top_fresh, 0, 1),
                    ("top-10, 5 fresh events", top_fresh, 0, 8),
                    ("events, 10 a request (10 users)", events_body(200_000, 10, 1), 10, 8),
                    ("events, 100 a request (10 users)", events_body(300_000, 10, 10), 100, 8),
                ]
            for label, body, events, connections in cases:
                request = ("POST", "/invocations", body, "application/json")
                m = recorded(port, request, connections, seconds)
                rate = f"{m['rps'] * events:9,.0f}" if events else f"{'':9}"
                print(
                    f"{name:8} {label:34} {connections:5} {m['rps']:8,.0f} {rate}"
                    f" {m['p50']:.2f} / {m['p99']:.2f}"
                )
            if name != "off":
                later = sorted(lag[1:])
                print(
                    f"{name:8} delay from an event's 200 to a changed score on 4 connections:"
                    f" first event {lag[0] * 1e3:.1f} ms; later median"
                    f" {statistics.median(later) * 1e3:.1f} ms, max {later[-1] * 1e3:.1f} ms"
                )


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
    parser.add_argument("--http-seconds", type=float, default=5, help="0: no HTTP figures")
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
        if args.http_seconds:
            over_http(model_dir, tmp, args.redis, args.http_seconds)
        if args.memory_users:
            for events in sorted({args.memory_events, KEEP}):
                users = args.memory_users if events == args.memory_events else 10_000
                redis_memory(args.redis, users, events)
        import redis

        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match="recsql-bench:*", count=10_000))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    main()
