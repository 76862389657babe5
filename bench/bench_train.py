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
epochs x runs. Test MSE is on each user's held-out last event.
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
        f"| popularity baseline | - | - | - | {popularity['hr']:.4f} | {popularity['ndcg']:.4f} |\n"
    )
    gpu_section(base, data, args)
    return 0


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
