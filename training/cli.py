"""`recsql synth | prepare | train | evaluate` (and `train-tabular`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_synth(subparsers)
    _add_prepare(subparsers)
    _add_train(subparsers)
    _add_evaluate(subparsers)


def _add_synth(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write synthetic REES46-shaped event files",
        description="Write seeded, REES46-shaped event CSVs with planted user/product groups "
        "that a recommender can learn. Same --seed, same bytes.",
    )
    p.add_argument("--rows", type=int, required=True, help="number of events to write")
    p.add_argument("--out", type=Path, required=True, help="output .csv/.csv.gz file or folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
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
    from training.train import add_train_arguments

    add_train_arguments(p)


def _run_train(args: argparse.Namespace) -> int:
    from training.train import run_train_command

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
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import run_evaluate_command

    return run_evaluate_command(args)
