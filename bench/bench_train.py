"""MFBlock training speed and quality against the seed's set-up, on synthetic REES46 events.

    python bench/bench_train.py [--events 2000000] [--epochs 1] [--runs 3] [--quick]

Prints a markdown section. Rows, all on the same prepared data and epochs:
  - seed baseline: `--init seed --update dense` with the seed's settings (sgd, lr 0.02,
    momentum 0.9, batch 1024): autograd, dense embedding gradients, torch.optim.SGD;
  - recsql defaults (init normal, fused sparse step, same optimiser settings);
  - recsql with the seed's init (isolates the init from the step);
  - recsql BPR (ranking objective), and the popularity baseline's HR/NDCG;
  - on CUDA, the default step at batch 1024 and at --gpu-batch (else "no CUDA device").
samples/s counts the training loop only (evaluation excluded): the median over
epochs x runs. Test MSE is on each user's held-out last event; beside it, "what the data
allows": the held-out event's weight predicted from the user's own earlier events with that
product (none, or the type of the latest one and whether it was in the same session), each
case's mean weight over the training events. The seed's set-up cannot see those events (it
drops a user's earlier events of their test product), so it can only tie with the mean.

`--default-times` adds the wall time of `recsql train` with its defaults (validation, early
stopping, artifact) on MovieLens latest-small, Complete Journey and 20M synthetic events
(issue K's goals: <= 60 s, <= 5 min, <= 15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import TrainConfig, make_config  # noqa: E402
from training.events import PreparedEvents, is_prepared_dir, prepare_events  # noqa: E402
from training.synth import SynthConfig, write_synthetic  # noqa: E402
from training.train import train  # noqa: E402


def prepared_data(events: int, seed: int, cache: Path | None) -> PreparedEvents:
    if cache and is_prepared_dir(cache):
        return PreparedEvents.load(cache)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        csv = Path(tmp) / "events.csv"
        write_synthetic(csv, SynthConfig(rows=events, seed=seed), progress=False)
        data = prepare_events([csv], progress=False)
    if cache:
        data.save(cache)
    return data


def run(cfg: TrainConfig, data: PreparedEvents, runs: int) -> dict:
    results = [
        train(replace(cfg, seed=cfg.seed + r), data, None, progress=False) for r in range(runs)
    ]
    speeds = [e["samples_per_s"] for m in results for e in m["epochs"]]
    final = results[0]["final"]
    return {
        "speed": statistics.median(speeds),
        "final": final,
        "popularity": results[0]["popularity"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=2_000_000, help="synthetic events to generate")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="runs per row (speed: median)")
    p.add_argument("--eval-users", type=int, default=5000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: auto)")
    p.add_argument("--gpu-batch", type=int, default=65536)
    p.add_argument("--cache", type=Path, help="prepared-data folder to reuse between runs")
    p.add_argument("--quick", action="store_true", help="200k events, 1 run (smoke test)")
    p.add_argument(
        "--default-times", action="store_true", help="also time `recsql train` defaults (~20 min)"
    )
    args = p.parse_args()
    if args.quick:
        args.events, args.runs = min(args.events, 200_000), 1
    data = prepared_data(args.events, 0, args.cache)
    base = make_config(  # the seed's objective and settings: the step's speed, not ranking
        {
            "objective": "mse",
            "epochs": args.epochs,
            "device": "cpu",
            "threads": args.threads,
            "eval_users": args.eval_users,
            "refit": False,
        }
    )
    rows = [
        ("seed baseline (init seed, dense update)", replace(base, init="seed", update="dense")),
        ("recsql mse (init normal, fused step)", base),
        ("recsql, init seed (fused step)", replace(base, init="seed")),
        ("recsql BPR (init normal, fused step)", replace(base, objective="bpr")),
    ]
    print("## Training (bench/bench_train.py)\n")
    print(
        f"{len(data.train_labels):,} training events, {len(data.user_ids):,} users, "
        f"{len(data.product_ids):,} items (synthetic, seed 0); {args.epochs} epoch(s), "
        f"batch 1024, sgd lr 0.02 momentum 0.9; {args.runs} run(s) per row; CPU threads: "
        f"{args.threads or 'auto'}; HR/NDCG@10 on {args.eval_users} users.\n"
    )
    print("| run | samples/s (CPU) | test MSE | mean-predictor MSE | HR@10 | NDCG@10 |")
    print("|---|---:|---:|---:|---:|---:|")
    popularity = None
    for name, cfg in rows:
        r = run(cfg, data, args.runs if cfg.update == "lazy" else 1)
        f, popularity = r["final"], r["popularity"]
        print(
            f"| {name} | {r['speed']:,.0f} | {f['test_mse']:.4f} | {f['mean_mse']:.4f} | "
            f"{f['hr']:.4f} | {f['ndcg']:.4f} |",
            flush=True,
        )
    print(
        f"| popularity baseline | - | - | - | {popularity['hr']:.4f} | {popularity['ndcg']:.4f} |"
    )
    allowed, mean = order_aware_mse(data)
    print(f"| what the data allows (the user's earlier events of the product) | - | {allowed:.4f}"
          f" | {mean:.4f} | - | - |\n")  # fmt: skip
    gpu_section(base, data, args)
    if args.default_times:
        default_times()
    return 0


def order_aware_mse(data: PreparedEvents) -> tuple[float, float]:
    """(MSE, mean predictor's MSE) of the held-out weights predicted by the mean weight of the
    training events whose user's latest earlier event with the same product had the same type
    and session (gap < 30 min) status, or who had none."""
    import numpy as np

    train_times, test_times = data.times()
    users = np.concatenate([data.train_users, data.test_users]).astype(np.int64)
    items = np.concatenate([data.train_items, data.test_items]).astype(np.int64)
    labels = np.concatenate([data.train_labels, data.test_labels]).astype(np.float64)
    times = np.concatenate([train_times, test_times])
    test = np.r_[np.zeros(len(data.train_users), bool), np.ones(len(data.test_users), bool)]
    order = np.lexsort((times, items, users))  # each (user, product)'s events in time order
    u, i, y, t = users[order], items[order], labels[order], times[order]
    same = np.r_[False, (u[1:] == u[:-1]) & (i[1:] == i[:-1])]
    before = np.r_[0.0, y[:-1]]  # the previous event's weight (a stand-in for its type)
    session = np.r_[False, np.diff(t) < 1800]
    case = np.where(same, before * 2 + session, -1.0)
    is_test = test[order]
    cases, inverse = np.unique(case, return_inverse=True)
    train_mean = np.bincount(inverse[~is_test], y[~is_test], len(cases)) / np.maximum(
        np.bincount(inverse[~is_test], minlength=len(cases)), 1
    )
    predicted = train_mean[inverse[is_test]]
    mean = float(y[~is_test].mean())
    return float(np.mean((predicted - y[is_test]) ** 2)), float(np.mean((mean - y[is_test]) ** 2))


def default_times() -> None:
    """Wall time of `recsql train` defaults on the three sets of issue K, one run each."""
    import json
    import subprocess
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_quality import completejourney, movielens

    print("| default `recsql train` (softmax, history) | events | wall s | HR@10 / NDCG@10 |")
    print("|---|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="bench-time-") as tmp:
        sets = []
        for name, load in (
            ("MovieLens latest-small", movielens),
            ("Complete Journey", completejourney),
        ):
            ev = load()
            folder = Path(tmp) / name.split()[0]
            PreparedEvents.from_events(ev.users, ev.items, ev.weights(), times=ev.times).save(
                folder
            )
            sets.append((name, folder, len(ev.users)))
        csv = Path(tmp) / "s20m.csv"
        write_synthetic(csv, SynthConfig(rows=20_000_000, seed=7), progress=False)
        sets.append(
            ("recsql synth, 20M rows (prepared first: not timed)", Path(tmp) / "s20m", 20_000_000)
        )
        prepare_events([csv], progress=False).save(sets[-1][1])
        csv.unlink()
        for name, folder, events in sets:
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "recsql_cli", "train", str(folder), "--model-dir",
                 str(folder / "model"), "--no-progress"],
                check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1],
            )  # fmt: skip
            seconds = time.perf_counter() - start
            final = json.loads((folder / "model" / "metrics.json").read_text())["final"]
            print(
                f"| {name} | {events:,} | {seconds:.0f} | {final['hr']:.4f} / {final['ndcg']:.4f} |"
            )
    print()


def gpu_section(base: TrainConfig, data: PreparedEvents, args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        print("GPU: no CUDA device.\n")
        return
    name = torch.cuda.get_device_name(0)
    for batch in (1024, args.gpu_batch):
        cfg = replace(base, device="cuda", batch_size=batch)
        r = run(cfg, data, args.runs)
        print(
            f"GPU ({name}), batch {batch}: {r['speed']:,.0f} samples/s, "
            f"test MSE {r['final']['test_mse']:.4f}"
        )
    print()


if __name__ == "__main__":
    sys.exit(main())
