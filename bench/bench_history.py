"""History models at serving scale (issue K): what reading users from their events costs.

    python bench/bench_history.py [--quick] [--users 3000000]

- Latency, in-process handler: 1 and 1,000 pairs (CSV), top-10 of 200,000 products for a
  known user, and top-10 from a 20-event history sent in the request, for a history model
  beside a per-user-embedding model (the previous default) of the same size (100,000
  users). Medians of interleaved rounds. Target: within 1.25x.
- Size: the artifact of a history model with `--users` users (each user's last 200 events
  kept; a heavy-tailed count, mean ~30, as REES46's) beside an embedding model's: the
  weights file, the load time and the loading process's peak RSS (a fresh subprocess each).

Random weights: these are speed figures, not quality.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _recsql import random_history_model, random_mfblock  # noqa: E402

from serve import Invocation, build_dataplane, from_env  # noqa: E402


def ids(users: int, items: int) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.arange(users, dtype=np.int64) * 13 + 500_000_000,
        np.arange(items, dtype=np.int64) * 7 + 1_000_000,
    )


def requests(user_ids: np.ndarray, item_ids: np.ndarray) -> dict[str, list[Invocation]]:
    rng = np.random.default_rng(1)

    def pairs(n: int) -> Invocation:
        u, p = rng.choice(user_ids, n), rng.choice(item_ids, n)
        body = "".join(f"{a},{b}\n" for a, b in zip(u.tolist(), p.tolist(), strict=True))
        return Invocation(body.encode(), "text/csv", "text/csv")

    def top(user: int) -> Invocation:
        return Invocation(json.dumps({"user_id": user, "top_k": 10}).encode(), "application/json")

    def history(seed: int) -> Invocation:
        events = [
            {"product_id": int(p), "event_type": "view", "event_time": 1_570_000_000 + 60 * k}
            for k, p in enumerate(np.random.default_rng(seed).choice(item_ids[:5000], 20))
        ]
        doc = {"history": events, "top_k": 10}
        return Invocation(json.dumps(doc).encode(), "application/json")

    return {
        "1 pair": [pairs(1) for _ in range(50)],
        "1,000 pairs": [pairs(1000) for _ in range(20)],
        "top-10, known user": [top(int(u)) for u in rng.choice(user_ids, 50)],
        "top-10, 20-event history": [history(s) for s in range(50)],
    }


def latency(model_dirs: dict[str, Path], user_ids, item_ids, rounds: int) -> list[str]:
    planes = {name: build_dataplane(from_env({}, model_dir=d)) for name, d in model_dirs.items()}
    cases = requests(user_ids, item_ids)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):  # interleaved: both models see the same machine state
        for case, batch in cases.items():
            for name, plane in planes.items():
                for request in batch:
                    start = time.perf_counter()
                    plane.invoke(request)
                    times.setdefault((case, name), []).append(time.perf_counter() - start)
    names = list(model_dirs)
    out = [
        f"| request | {' | '.join(f'{n} ms' for n in names)} | ratio |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for case in cases:
        medians = [statistics.median(times[(case, n)][len(cases[case]) :]) for n in names]
        cells = " | ".join(f"{m * 1e3:.3f}" for m in medians)
        out.append(f"| {case} | {cells} | {medians[-1] / medians[0]:.2f}x |")
    return out


_LOAD = """
import resource, sys, time
sys.path.insert(0, {root!r})
from model import load_model
start = time.perf_counter()
load_model({path!r})
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def load_cost(model_dir: Path) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of load_model in a fresh process."""
    code = _LOAD.format(root=str(ROOT), path=str(model_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, kib = out.stdout.split()
    return float(seconds), int(kib) / 2**20


def size(users: int, items: int) -> list[str]:
    user_ids, item_ids = ids(users, items)
    out = [
        f"| {users:,} users, {items:,} products | weights file | events kept | load s | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (
            ("embedding", partial(random_mfblock, probability=True)),
            ("history", random_history_model),
        ):
            folder = make(Path(tmp) / name, user_ids, item_ids)
            weights = (folder / "weights.safetensors").stat().st_size
            events = "-"
            if name == "history":
                from safetensors import safe_open

                with safe_open(str(folder / "weights.safetensors"), "numpy") as f:
                    events = f"{f.get_slice('events.items').get_shape()[0]:,}"
            seconds, rss = load_cost(folder)
            out.append(
                f"| {name} | {weights / 2**30:.2f} GiB | {events} | {seconds:.1f} | {rss:.2f} GiB |"
            )
            (folder / "weights.safetensors").unlink()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller models, fewer rounds")
    p.add_argument("--users", type=int, default=3_000_000, help="users of the size rows")
    args = p.parse_args()
    users, rounds, big = (10_000, 3, 300_000) if args.quick else (100_000, 10, args.users)
    user_ids, item_ids = ids(users, 200_000)
    sections = ["## History models at serving scale (bench/bench_history.py)", ""]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {
            "embedding": random_mfblock(
                Path(tmp) / "embedding", user_ids, item_ids, probability=True
            ),
            "history": random_history_model(Path(tmp) / "history", user_ids, item_ids),
        }
        sections += [
            f"In-process handler, {users:,} users, 200,000 products, medians of {rounds}"
            " interleaved rounds (ratio: history / embedding):",
            "",
            *latency(dirs, user_ids, item_ids, rounds),
            "",
        ]
    sections += [*size(big, 165_000), ""]
    print("\n".join(sections))
    print(f"(bench peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
