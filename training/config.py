"""TrainConfig: every training setting, as a CLI flag (`recsql train --help`) and a
SageMaker hyperparameter. Defaults are the tuned softmax objective's; `--objective mse`
or `bpr` start from the seed's settings (SEED_DEFAULTS) instead.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import DataError

CHOICES = {
    "objective": ("softmax", "mse", "bpr"),
    "init": ("normal", "seed"),
    "opt": ("adam", "sgd", "adagrad"),
    "update": ("lazy", "dense"),
    "device": ("auto", "cpu", "cuda"),
    "train_on": ("new", "all"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the tuned softmax objective's; `--objective mse` or `bpr` given alone
    start from the seed's settings instead (SEED_DEFAULTS), flags still override."""

    # model: the seed's names where the seed had them
    num_embeddings: int = 64
    dropout: float = 0.0  # on both towers' outputs while training (the seed: 0.5)
    init: str = "normal"  # "seed": the seed's Xavier(magnitude=60); "normal": see MFBlock
    objective: str = "softmax"  # softmax (ranking), mse (the seed's L2), bpr (pairwise)
    temperature: float = 1.0  # softmax: logits are scores / temperature
    negatives: int = 2048  # sampled softmax: shared uniform negatives per batch
    full_softmax_items: int = 4096  # softmax over every item up to this catalogue size
    recency: float = 0.0  # softmax: an event's weight halves every `recency` later events
    history: int = 20  # softmax: the user tower reads the last N events; 0 = a per-user embedding
    history_dropout: float = 0.3  # softmax history: share of window events dropped in training
    recent_events: int = 200  # events per user the artifact keeps (tower and repeat term read)
    train_on: str = "new"  # softmax history: events of products new to their user, or "all"
    # optimiser (seed: sgd, lr 0.02, momentum 0.9, wd 0, batch 1024)
    opt: str = "adam"
    lr: float = 0.003
    embedding_lr: float = 0.01  # softmax: the embedding rows' (a row moves only in its batches)
    momentum: float = 0.9
    wd: float = 0.03  # softmax: L2 on the tower outputs (bounds the logits); mse, bpr: weights
    update: str = "lazy"  # "lazy": fused sparse rows; "dense": the seed's dense update
    epochs: int = 20  # at most: early stopping on the held-out events ends sooner
    patience: int = 3  # evaluations without a better held-out score before stopping; 0 = never
    eval_every: int = 2_000_000  # training events between evaluations; 0 = once per epoch
    refit: bool = False  # after validating, retrain on every event for the chosen epochs
    batch_size: int = 1024  # a flag, never changed silently (a GPU wants 64k+)
    # run
    device: str = "auto"
    threads: int = 0  # torch CPU threads in the training loop; 0 = auto (see _loop_threads)
    seed: int = 0
    min_events: int = 5  # used when the inputs are raw event files
    eval_users: int = 10000  # users ranked per epoch for HR/NDCG; 0 = all
    k: int = 10
    train_mse_rows: int = 1_000_000  # training rows sampled for the per-epoch train MSE

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise DataError(
                    f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}"
                )
        positive = ("num_embeddings", "epochs", "batch_size", "k", "lr", "min_events")
        for name in positive + ("embedding_lr", "temperature", "negatives"):
            if not getattr(self, name) > 0:
                raise DataError(f"{name} must be > 0, not {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise DataError(f"dropout must be in [0, 1), not {self.dropout!r}")
        if not 0.0 <= self.history_dropout < 1.0:
            raise DataError(f"history_dropout must be in [0, 1), not {self.history_dropout!r}")
        if self.history < 0 or self.recent_events < self.history:
            raise DataError(
                f"history must be >= 0 and recent_events >= history, not {self.history!r}"
                f" and {self.recent_events!r}"
            )

        if min(self.momentum, self.wd, self.threads, self.eval_users, self.patience) < 0:
            raise DataError("momentum, wd, threads, eval_users and patience must be >= 0")
        if self.eval_every < 0:
            raise DataError(f"eval_every must be >= 0, not {self.eval_every!r}")
        if self.objective == "softmax" and (self.opt != "adam" or self.update != "lazy"):
            raise DataError(
                f"--objective softmax (the default) trains with --opt adam --update lazy, not "
                f"--opt {self.opt} --update {self.update}; for the seed's hyperparameters "
                "add --objective mse (SageMaker: objective=mse)"
            )
        if self.objective != "softmax" and self.opt == "adam":
            raise DataError("--opt adam is for --objective softmax; mse and bpr take sgd, adagrad")

    @property
    def history_length(self) -> int:
        """Events the user tower reads: `history` for softmax; mse and bpr (the seed's
        objectives) always learn a per-user embedding."""
        return self.history if self.objective == "softmax" else 0


# What `--objective mse|bpr` starts from: the seed's optimiser, epochs and no early stopping.
SEED_DEFAULTS: dict[str, Any] = {
    "history": 0,
    "refit": True,
    "opt": "sgd",
    "lr": 0.02,
    "wd": 0.0,
    "dropout": 0.5,
    "epochs": 3,
    "patience": 0,
    "eval_every": 0,
}


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A config from the values a user set; the rest from the objective's defaults."""
    objective = values.get("objective", TrainConfig.objective)
    base = SEED_DEFAULTS if objective in ("mse", "bpr") else {}
    return TrainConfig(**{**base, **values})


FIELD_TYPES = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a config from loosely typed values (SageMaker hyperparameters, JSON)."""
    kwargs: dict[str, Any] = {}
    for raw_name, value in values.items():
        name = raw_name.replace("-", "_")
        if name not in FIELD_TYPES:
            raise DataError(f"unknown hyperparameter {raw_name!r}; known: {', '.join(FIELD_TYPES)}")
        kwargs[name] = _coerce(name, value, FIELD_TYPES[name])
    return make_config(kwargs)


def _coerce(name: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"  # SageMaker sends every hyperparameter as a string
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind is int and not isinstance(value, bool):
            return int(value)
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    raise DataError(f"hyperparameter {name} must be {kind.__name__}, not {value!r}")


FIELD_HELP = {
    "objective": "softmax: rank the event's product over the catalogue (default); mse: the "
    "seed's regression on event weights; bpr: pairwise ranking",
    "temperature": "softmax: logits are scores / temperature",
    "negatives": "sampled softmax: uniform negatives shared by a batch",
    "full_softmax_items": "softmax over every item up to this many items, sampled above",
    "recency": "softmax: an event's weight halves every N later events of its user; 0 = off",
    "history": "softmax: the user tower reads each user's last N events (their products, order "
    "and types), so a user the model never saw is scored like one it did; 0 = a per-user "
    "embedding, the seed's",
    "history_dropout": "softmax history: share of a window's events dropped while training",
    "train_on": "softmax history: new = the softmax learns from the events whose product is new"
    " to their user and the repeat term learns which touched products come back (faster: a"
    " shop's events mostly repeat); all = from every event",
    "recent_events": "events per user the artifact keeps (last N): the tower reads the last "
    "--history of them, the repeat term (products the user touched) all of them",
    "embedding_lr": "softmax: learning rate of the embedding rows; a row moves only in the "
    "batches that hold its user or product, so it gets far fewer steps than --lr's Dense layers",
    "wd": "weight decay (softmax: L2 on the tower outputs)",
    "epochs": "most epochs (early stopping may end sooner)",
    "patience": "stop after N evaluations without a better held-out score; 0 = never",
    "eval_every": "evaluate on the held-out events every N training events (an epoch is "
    "split into equal parts) or, if an epoch is shorter, after each epoch; 0 = each epoch",
    "refit": "after validating, retrain on every event for the best epoch count and serve that "
    "(a history model serves the validated one: its users are read from every event anyway)",
    "dropout": "dropout on both towers' outputs while training",
    "eval_users": "held-out users ranked each epoch for HR/NDCG; 0 = all",
    "min_events": "users and products with fewer events are dropped (raw event files)",
    "threads": "torch CPU threads while training; 0 = auto",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    seed = ", ".join(f"{k} {v}" for k, v in SEED_DEFAULTS.items())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        shown = f"(default {f.default}" + (
            f"; mse, bpr: {SEED_DEFAULTS[f.name]})" if f.name in SEED_DEFAULTS else ")"
        )
        if f.name in FIELD_HELP:
            shown = f"{FIELD_HELP[f.name]} {shown}"
        if FIELD_TYPES[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
            continue
        p.add_argument(
            flag,
            type=FIELD_TYPES[f.name],
            default=None,  # unset flags take the objective's default (make_config)
            choices=CHOICES.get(f.name),
            help=shown,
        )
    p.epilog = f"--objective mse or bpr without other flags uses the seed's settings: {seed}."
    p.add_argument(
        "--model-dir",
        type=Path,
        default=Path("out/model"),
        help="where the artifact goes (default ./out/model)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # distributed hook (issue E): see training/distributed.py
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train on N local processes, one per GPU or gloo on CPU (default 1)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return make_config({k: v for k, v in given.items() if v is not None})


def resolve_device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise DataError(
            f"--device cuda: no CUDA device available to torch {torch.__version__} "
            "here; use --device cpu or auto"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
