"""`recsql synth | prepare | train | evaluate` (and `train-tabular`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_synth(subparsers)
    _add_prepare(subparsers)
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_train_tabular(subparsers)


def _add_synth(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write synthetic REES46-shaped event files",
        description="Write seeded, REES46-shaped event CSVs that behave like a shop: sessions "
        "(a product viewed several times, then carted and bought), consumables bought again, "
        "interests that drift between hidden groups; REES46's event type shares and "
        "heavy-tailed users and products. Same --seed, same bytes.",
    )
    p.add_argument("--rows", type=int, required=True, help="number of events to write")
    p.add_argument("--out", type=Path, required=True, help="output .csv/.csv.gz file or folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--users", type=int, help="number of users (default rows/16)")
    p.add_argument("--products", type=int, help="number of products (default rows/350)")
    p.add_argument("--groups", type=int, help="hidden user/product groups (default products/50)")
    p.add_argument("--files", type=int, default=1, help="split into N files (--out a folder)")
    p.add_argument("--gzip", action="store_true", help="write .csv.gz files into a folder --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from training.synth import run_synth_command

    return run_synth_command(args)


def _add_prepare(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="turn REES46 event files into train/test arrays",
        description="Weight events (purchase 4, cart 3, remove_from_cart 2, other 1), keep users "
        "and products with >= 5 events, index them, hold out each user's last event.",
    )
    p.add_argument("inputs", nargs="+", type=Path, help="event .csv/.csv.gz files or folders")
    p.add_argument("--out", type=Path, required=True, help="folder for the prepared data")
    p.add_argument("--min-events", type=int, default=5, help="per user and product (default 5)")
    p.add_argument("--memory-limit", help="DuckDB memory_limit, e.g. 4GB (default 4GB)")
    p.add_argument("--threads", type=int, help="DuckDB threads (default: all cores)")
    p.add_argument("--temp-dir", type=Path, help="where DuckDB spills (default: system temp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from training.events import run_prepare_command

    return run_prepare_command(args)


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train MFBlock on event files (or run as a SageMaker training job)",
        description="Train the MFBlock recommender. With no inputs and /opt/ml present (or "
        "SM_* variables set), run as a SageMaker training job.",
    )
    p.add_argument("inputs", nargs="*", type=Path, help="event files/folders or a prepared folder")
    p.set_defaults(func=_run_train)
    from training.config import add_train_arguments

    add_train_arguments(p)


def _run_train(args: argparse.Namespace) -> int:
    from training.run import run_train_command

    return run_train_command(args)


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="HR@K / NDCG@K and MSE of a model on held-out events",
        description="Evaluate a model directory on event files or a prepared folder "
        "(leave-last-out, full ranking, the user's training items excluded).",
    )
    p.add_argument("inputs", nargs="+", type=Path, help="event files/folders or a prepared folder")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--k", type=int, default=10, help="cut-off for HR and NDCG (default 10)")
    p.add_argument(
        "--eval-users",
        type=int,
        default=10000,
        help="rank a seeded sample of this many test users; 0 = all (default 10000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the user sample (default 0)")
    p.add_argument(
        "--min-events", type=int, default=5, help="when preparing raw event files (default 5)"
    )
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import run_evaluate_command

    return run_evaluate_command(args)


def _add_train_tabular(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-tabular",
        help="train a tabular classifier (XGBoost preset or AutoML) on a CSV",
        description="Train a binary classifier on a CSV with a header and --target, or a "
        "headerless CSV with the label first. Writes the model (XGBoost UBJ, LightGBM text or "
        "logistic JSON; never pickle), leaderboard.csv, fit_summary.txt, model_performance.txt, "
        "test_prediction.csv and eval.png.",
    )
    from training.tabular import add_arguments

    add_arguments(p)
    p.set_defaults(func=_run_train_tabular)
    f = subparsers.add_parser(
        "synth-fraud",
        help="write seeded insurance claims + customers tables and their join",
        description="Write customers.csv and claims.csv with a planted fraud signal, and "
        "dataset.csv (claims joined with customers) for `train-tabular --target fraud`.",
    )
    f.add_argument("--out", type=Path, required=True, help="output folder")
    f.add_argument("--rows", type=int, default=5000, help="number of claims (default 5000)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_run_synth_fraud)


def _run_train_tabular(args: argparse.Namespace) -> int:
    from training.tabular import run_train_tabular_command

    return run_train_tabular_command(args)


def _run_synth_fraud(args: argparse.Namespace) -> int:
    from training.fraud import run_synth_fraud_command

    return run_synth_fraud_command(args)
