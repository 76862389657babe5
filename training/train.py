"""Train MFBlock on prepared events. Reads top to bottom, like nanoGPT's train.py.

    config (dataclass + CLI / SageMaker overrides) -> data on the device -> model
    -> per epoch: shuffled slices, one fused step per batch -> held-out metrics
    -> artifact (weights, ids, manifest with the config) + metrics.json + curves.png

Speed (why the step is hand-written): the ids, labels and all parameters stay
on the device; an epoch is one `randperm` and contiguous slices, no DataLoader.
With `update="lazy"` (default) a step runs without autograd: the forward pass,
its hand-derived backward (checked against autograd in the tests) and the
optimiser update for the embedding rows the batch touched only (gathered with
`index_select`, written back with `index_add_`). torch's Bernoulli sampler is
~30x slower than the rest of the step on CPU, so dropout masks are compared
random bytes: the keep probability is rounded to a multiple of 1/256 (0.5 is
exact).

Momentum without touching every row: the seed's dense SGD moves *every*
embedding row by its decaying velocity on every step. Here a row's skipped
steps are caught up when the batch next touches it (k skipped steps move it by
lr * v * (mu + ... + mu^k) and decay v by mu^k), and all rows are caught up at
the end of each epoch, so with wd = 0 the weights equal the seed's dense
momentum SGD (checked in the tests). With wd > 0 the decay of an untouched row
is skipped (lazy). `update="dense"` runs the seed's way (autograd, dense
embedding gradients, torch.optim.SGD): the benchmark's baseline.

Default init ("normal"): MFBlock's N(0, 0.1^2) embeddings and He-uniform Dense
weights, plus tower biases set to sqrt(mean label / num_embeddings), so the
first predictions average about the mean label (like setting an output bias to
the target mean) instead of starting near 0. `init="seed"` is left untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import DataError
from training.evaluate import (
    SeenItems,
    mse,
    plot_curves,
    popularity_metrics,
    ranking_metrics,
    sample_rows,
)

log = logging.getLogger(__name__)

CHOICES = {
    "objective": ("softmax", "mse", "bpr"),
    "init": ("normal", "seed"),
    "opt": ("adam", "sgd", "adagrad"),
    "update": ("lazy", "dense"),
    "device": ("auto", "cpu", "cuda"),
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
    # optimiser (seed: sgd, lr 0.02, momentum 0.9, wd 0, batch 1024)
    opt: str = "adam"
    lr: float = 0.003
    momentum: float = 0.9
    wd: float = 0.03  # softmax: L2 on the tower outputs (bounds the logits); mse, bpr: weights
    update: str = "lazy"  # "lazy": fused sparse rows; "dense": the seed's dense update
    epochs: int = 20  # at most: early stopping on the held-out events ends sooner
    patience: int = 3  # epochs without a better held-out score before stopping; 0 = never
    refit: bool = True  # after validating, retrain on every event for the chosen epochs
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
        for name in positive + ("temperature", "negatives"):
            if not getattr(self, name) > 0:
                raise DataError(f"{name} must be > 0, not {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise DataError(f"dropout must be in [0, 1), not {self.dropout!r}")
        if min(self.momentum, self.wd, self.threads, self.eval_users, self.patience) < 0:
            raise DataError("momentum, wd, threads, eval_users and patience must be >= 0")
        if self.objective == "softmax" and (self.opt != "adam" or self.update != "lazy"):
            raise DataError(
                f"--objective softmax (the default) trains with --opt adam --update lazy, not "
                f"--opt {self.opt} --update {self.update}; for the seed's hyperparameters "
                "add --objective mse (SageMaker: objective=mse)"
            )
        if self.objective != "softmax" and self.opt == "adam":
            raise DataError("--opt adam is for --objective softmax; mse and bpr take sgd, adagrad")


# What `--objective mse|bpr` starts from: the seed's optimiser, epochs and no early stopping.
SEED_DEFAULTS: dict[str, Any] = {
    "opt": "sgd",
    "lr": 0.02,
    "wd": 0.0,
    "dropout": 0.5,
    "epochs": 3,
    "patience": 0,
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
    "wd": "weight decay (softmax: L2 on the tower outputs)",
    "epochs": "most epochs (early stopping may end sooner)",
    "patience": "stop after N epochs without a better held-out score; 0 = never",
    "refit": "after validating, retrain on every event for the best epoch count and serve that",
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


# ---------------------------------------------------------------------------- the step


class FusedStep:
    """One batch without autograd: forward, hand-derived backward, lazy update."""

    def __init__(self, model: Any, cfg: TrainConfig, generator: Any) -> None:
        import torch

        self.cfg, self.gen = cfg, generator
        self.wu, self.wi = model.user_embeddings.weight.data, model.item_embeddings.weight.data
        self.dense = [
            model.dense_user.weight.data,
            model.dense_user.bias.data,
            model.dense_item.weight.data,
            model.dense_item.bias.data,
        ]
        self.dense_state = [torch.zeros_like(p) for p in self.dense]
        self.emb_state = [torch.zeros_like(self.wu), torch.zeros_like(self.wi)]
        # the step that last touched each row, for the momentum catch-up
        self.last = [
            torch.zeros(len(w), dtype=torch.int64, device=w.device) for w in (self.wu, self.wi)
        ]
        self.steps = 0
        self.keep_bytes = round((1.0 - cfg.dropout) * 256)  # keep if random byte < this
        self.scale = 256.0 / self.keep_bytes

    def _mask(self, h: Any) -> Any:
        """relu'(h) * inverted-dropout mask, as one float tensor."""
        import torch

        active = h > 0
        if self.keep_bytes < 256:
            words = torch.empty((h.numel() + 7) // 8, dtype=torch.int64, device=h.device)
            words.random_(-(2**63), None, generator=self.gen)  # all 64 bits random
            active &= words.view(torch.uint8)[: h.numel()].view(h.shape) < self.keep_bytes
        return active.to(h.dtype).mul_(self.scale)

    def __call__(self, users: Any, items: Any, labels: Any, negatives: Any = None) -> Any:
        import torch
        import torch.nn.functional as F

        du_w, du_b, di_w, di_b = self.dense
        if negatives is not None:
            items = torch.cat([items, negatives])
        touched = [torch.unique(ids, return_inverse=True) for ids in (users, items)]
        self.steps += 1
        if self.cfg.opt == "sgd" and self.cfg.momentum:  # bring the rows up to date first
            for table, (rows, _) in enumerate(touched):
                self._catch_up(table, rows, self.steps - 1 - self.last[table].index_select(0, rows))
        ue, ie = self.wu.index_select(0, users), self.wi.index_select(0, items)
        hu, hi = torch.addmm(du_b, ue, du_w.t()), torch.addmm(di_b, ie, di_w.t())
        mu, mi = self._mask(hu), self._mask(hi)
        a, b = hu.mul_(mu), hi.mul_(mi)  # tower outputs after relu and dropout
        n = len(users)
        if negatives is None:  # the seed's L2 loss, 0.5 * (pred - label)^2
            err = (a * b).sum(1) - labels
            loss = 0.5 * (err * err).mean()
            g = (err / n).unsqueeze(1)
            ga, gb = g * b, g * a
        else:  # BPR: -log sigmoid(score(u, pos) - score(u, neg))
            diff = b[:n] - b[n:]
            x = (a * diff).sum(1)
            loss = F.softplus(-x).mean()
            g = ((torch.sigmoid(x) - 1.0) / n).unsqueeze(1)
            ga, gp = g * diff, g * a
            gb = torch.cat([gp, -gp])
        ghu, ghi = ga.mul_(mu), gb.mul_(mi)
        grads = [ghu.t() @ ue, ghu.sum(0), ghi.t() @ ie, ghi.sum(0)]
        gue, gie = ghu @ du_w, ghi @ di_w  # before the Dense weights move
        self._update_dense(grads)
        self._update_rows(0, *touched[0], gue)
        self._update_rows(1, *touched[1], gie)
        return loss

    def flush(self) -> None:
        """Catch every row up to the current step (end of epoch, before evaluation)."""
        import torch

        if self.cfg.opt != "sgd" or not self.cfg.momentum:
            return
        for table in (0, 1):
            rows = torch.arange(len(self.last[table]), device=self.last[table].device)
            self._catch_up(table, rows, self.steps - self.last[table])

    def _catch_up(self, table: int, rows: Any, skipped: Any) -> None:
        """Apply `skipped` steps of zero-gradient momentum to (unique) rows."""
        import torch

        mu, weight, state = self.cfg.momentum, (self.wu, self.wi)[table], self.emb_state[table]
        decay = torch.pow(mu, skipped.to(weight.dtype)).unsqueeze(1)  # mu^k
        v = state.index_select(0, rows)
        weight.index_add_(0, rows, v * ((1.0 - decay) * (-self.cfg.lr * mu / (1.0 - mu))))
        state.index_copy_(0, rows, v.mul_(decay))
        self.last[table].index_fill_(0, rows, self.steps)

    def _update_dense(self, grads: list[Any]) -> None:
        import torch

        cfg = self.cfg
        if cfg.wd:
            torch._foreach_add_(grads, self.dense, alpha=cfg.wd)
        if cfg.opt == "adagrad":
            torch._foreach_addcmul_(self.dense_state, grads, grads)
            steps = torch._foreach_div(
                grads, torch._foreach_add(torch._foreach_sqrt(self.dense_state), 1e-10)
            )
        elif cfg.momentum:
            torch._foreach_mul_(self.dense_state, cfg.momentum)
            torch._foreach_add_(self.dense_state, grads)
            steps = self.dense_state
        else:
            steps = grads
        torch._foreach_add_(self.dense, steps, alpha=-cfg.lr)

    def _update_rows(self, table: int, rows: Any, inverse: Any, grad: Any) -> None:
        """Sum the gradients of duplicate rows, then update only the touched rows."""
        import torch

        cfg, weight, state = self.cfg, (self.wu, self.wi)[table], self.emb_state[table]
        g = torch.zeros(len(rows), weight.shape[1], device=grad.device).index_add_(0, inverse, grad)
        if cfg.wd:
            g.add_(weight.index_select(0, rows), alpha=cfg.wd)
        if cfg.opt == "adagrad":
            s = state.index_select(0, rows).addcmul_(g, g)
            state.index_copy_(0, rows, s)
            g = g.div_(s.sqrt_().add_(1e-10))
        elif cfg.momentum:
            g = state.index_select(0, rows).mul_(cfg.momentum).add_(g)
            state.index_copy_(0, rows, g)
        weight.index_add_(0, rows, g.mul(-cfg.lr))


class DenseStep:
    """The seed's step: autograd, nn.Dropout, dense gradients, a torch optimiser."""

    def __init__(self, model: Any, cfg: TrainConfig) -> None:
        import torch

        self.model = model
        if cfg.opt == "adagrad":
            self.opt = torch.optim.Adagrad(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
        else:
            self.opt = torch.optim.SGD(
                model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd
            )

    def __call__(self, users: Any, items: Any, labels: Any, negatives: Any = None) -> Any:
        import torch.nn.functional as F

        m = self.model
        if negatives is None:
            loss = 0.5 * ((m(users, items) - labels) ** 2).mean()
        else:
            a = m.dropout(m.user_tower(users))
            pos = (a * m.dropout(m.item_tower(items))).sum(1)
            neg = (a * m.dropout(m.item_tower(negatives))).sum(1)
            loss = F.softplus(neg - pos).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


# ---------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, data: Any, model_dir: Path | None, progress: bool = True) -> dict:
    """Train on PreparedEvents; write the artifact to model_dir (None: don't). Returns metrics.

    Validates on the held-out events (data.test_*) each epoch and stops after `patience`
    epochs without a better score; then, with `refit`, trains a fresh model on every event
    (training and held-out) for the best epoch count: that model is the one saved.
    """
    import torch

    device = resolve_device(cfg.device)
    ev = EvalSet.build(cfg, data, len(data.user_ids), len(data.product_ids))
    model, history, best = fit(cfg, data, device, ev, progress)
    metrics = run_metrics(cfg, history, ev, best)
    if cfg.refit and len(data.test_users):
        started = time.perf_counter()
        model, _, _ = fit(
            dataclasses.replace(cfg, epochs=best["epoch"], patience=0),
            _with_test_events(data),
            device,
            None,
            progress,
        )
        metrics["refit"] = {
            "epochs": best["epoch"],
            "events": len(data.train_labels) + len(data.test_labels),
            "seconds": time.perf_counter() - started,
        }
    metrics["served_model"] = "refit on every event" if "refit" in metrics else "validated model"
    if model_dir is not None:
        with torch.no_grad():
            save_artifact(model, cfg, data, metrics, ev, Path(model_dir), device)
    return metrics


def fit(
    cfg: TrainConfig, data: Any, device: Any, ev: EvalSet | None, progress: bool
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Train one model; with `ev`, evaluate each epoch and keep the best epoch's weights."""
    import torch

    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    step = make_step(cfg, model, data, gen)
    users, items, labels = device_arrays(data, device)
    if cfg.objective == "softmax" and cfg.recency:
        labels *= torch.as_tensor(recency_weights(data.train_users, cfg.recency), device=device)
    log.info(
        "training %s: %d users, %d items, %d events on %s",
        cfg.objective,
        model.num_users,
        model.num_items,
        len(labels),
        device,
    )
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    best_state = None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss, seconds = run_epoch(
            step,
            cfg,
            users,
            items,
            labels,
            model.num_items,
            gen,
            f"epoch {epoch}/{cfg.epochs}",
            progress,
        )
        if isinstance(step, FusedStep):
            step.flush()
        model.eval()
        row = {"epoch": epoch, "train_loss": loss, "seconds": seconds}
        row["samples_per_s"] = len(labels) / seconds
        if ev is None:
            history.append(row)
            continue
        row.update(epoch_metrics(model, ev, device))
        history.append(row)
        mse_note = (
            f", test MSE {row['test_mse']:.4f} (mean predictor {row['mean_mse']:.4f})"
            if cfg.objective == "mse"
            else ""
        )
        log.info(
            "epoch %d: loss %.4f%s, HR@%d %.4f, NDCG@%d %.4f, %.0f samples/s",
            epoch,
            loss,
            mse_note,
            cfg.k,
            row["hr"],
            cfg.k,
            row["ndcg"],
            row["samples_per_s"],
        )
        if not best or _better(cfg, row, best):
            best = row
            if cfg.patience:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif cfg.patience and epoch - best["epoch"] >= cfg.patience:
            log.info("no better held-out score for %d epochs: stopping", cfg.patience)
            break
    if best_state is not None and best["epoch"] != history[-1]["epoch"]:
        model.load_state_dict(best_state)
    return model, history, best or history[-1]


def recency_weights(train_users: np.ndarray, half_life: float) -> np.ndarray:
    """0.5 ** (later events of the same user / half_life) per training row (rows oldest first)."""
    users = np.asarray(train_users, np.int64)
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users)
    ends = np.cumsum(counts)[users[order]]  # one past each row's user block, in sorted order
    later = np.empty(len(users), np.float64)
    later[order] = ends - 1 - np.arange(len(users))
    return (0.5 ** (later / half_life)).astype(np.float32)


def _better(cfg: TrainConfig, row: dict[str, Any], best: dict[str, Any]) -> bool:
    """The early-stopping measure: test MSE for mse, NDCG@k for the ranking objectives."""
    if cfg.objective == "mse":
        return row["test_mse"] < best["test_mse"]
    return row["ndcg"] > best["ndcg"]


def _with_test_events(data: Any) -> Any:
    """The same events with each user's held-out one moved into training (for the refit)."""
    return dataclasses.replace(
        data,
        train_users=np.concatenate([data.train_users, data.test_users]),
        train_items=np.concatenate([data.train_items, data.test_items]),
        train_labels=np.concatenate([data.train_labels, data.test_labels]),
        test_users=data.test_users[:0],
        test_items=data.test_items[:0],
        test_labels=data.test_labels[:0],
    )


def make_step(cfg: TrainConfig, model: Any, data: Any, gen: Any) -> Any:
    if cfg.objective == "softmax":
        from training.softmax import SoftmaxStep

        counts = np.bincount(data.train_items, minlength=model.num_items)
        return SoftmaxStep(model, cfg, counts, gen)
    return FusedStep(model, cfg, gen) if cfg.update == "lazy" else DenseStep(model, cfg)


def build_model(cfg: TrainConfig, data: Any) -> Any:
    """The MFBlock a run starts from, initialised on the CPU so that a seed gives the
    same start on any device (and on every rank of a distributed run)."""
    import torch

    from model.mfblock import MFBlock

    if len(data.train_labels) == 0 or len(data.user_ids) == 0 or len(data.product_ids) == 0:
        raise DataError("no training events left after preparation")
    model = MFBlock(
        len(data.user_ids),
        len(data.product_ids),
        cfg.num_embeddings,
        cfg.dropout,
        sparse=cfg.update == "lazy",
    )
    model.init_weights(cfg.init, generator=torch.Generator().manual_seed(cfg.seed))
    global_mean = float(np.mean(data.train_labels, dtype=np.float64))
    if cfg.init == "normal" and global_mean > 0:
        with torch.no_grad():  # start predictions near the mean label (see the docstring)
            for dense in (model.dense_user, model.dense_item):
                dense.bias.fill_((global_mean / cfg.num_embeddings) ** 0.5)
    return model


def device_arrays(data: Any, device: Any) -> tuple[Any, Any, Any]:
    """Training users, items (int64) and labels (float32), resident on `device` for the run."""
    import torch

    def on_device(a: np.ndarray, dtype: Any) -> Any:
        return torch.as_tensor(np.asarray(a), device=device).to(dtype)

    return (
        on_device(data.train_users, torch.int64),
        on_device(data.train_items, torch.int64),
        on_device(data.train_labels, torch.float32),
    )


def run_metrics(
    cfg: TrainConfig, history: list[dict[str, Any]], ev: EvalSet, best: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The metrics document of a run (metrics.json and the manifest's `metrics`): `final` is
    the held-out score of the epoch kept (the best one under early stopping)."""
    return {
        "final": best or history[-1],
        "epochs": history,
        "popularity": ev.popularity,
        "mean_predictor_test_mse": ev.mean_mse,
        "global_mean": ev.global_mean,
        "eval_users": len(ev.rank_rows),
        "config": asdict(cfg),
    }


def run_epoch(
    step: Any,
    cfg: TrainConfig,
    users: Any,
    items: Any,
    labels: Any,
    num_items: int,
    gen: Any,
    desc: str,
    progress: bool,
) -> tuple[float, float]:
    """One pass in a fresh random order; returns (mean loss, seconds in the loop)."""
    import torch
    from tqdm import tqdm

    n, bs, dev = len(labels), cfg.batch_size, labels.device
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(_loop_threads(cfg, threads))
    _sync(dev)
    start = time.perf_counter()
    perm = torch.randperm(n, device=dev, generator=gen)
    u, i, y = users[perm], items[perm], labels[perm]
    neg = (
        torch.randint(num_items, (n,), device=dev, generator=gen)
        if cfg.objective == "bpr"
        else None
    )
    total = torch.zeros((), device=dev)
    bar = tqdm(
        total=n,
        desc=desc,
        unit="ev",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
        mininterval=0.5,
        leave=False,
    )
    grad = cfg.update == "dense" or cfg.objective == "softmax"
    with torch.enable_grad() if grad else torch.no_grad():
        for batch, s in enumerate(range(0, n, bs)):
            e = min(s + bs, n)
            loss = step(u[s:e], i[s:e], y[s:e], None if neg is None else neg[s:e])
            total += loss * (e - s)
            bar.update(e - s)
            if progress and batch % 512 == 0:  # .item() waits for the device: rarely
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    _sync(dev)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    bar.close()
    return float(total) / n, seconds


def _loop_threads(cfg: TrainConfig, default: int) -> int:
    """One thread for the fused step at small batches: its ops are ~100k floats, too small
    to split, and on a busy machine idle-waiting threads cost 10x (measured: 680k vs 50k
    samples/s on 2 shared cores). Bigger batches, the dense update and the softmax step (one
    batch x candidates matrix product) use every core."""
    if cfg.threads:
        return cfg.threads
    fused = cfg.update == "lazy" and cfg.objective != "softmax"
    return 1 if fused and cfg.batch_size <= 8192 else default


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EvalSet:
    test_users: np.ndarray
    test_items: np.ndarray
    test_labels: np.ndarray
    train_rows: np.ndarray  # sample of training rows for train MSE
    train_users: np.ndarray
    train_items: np.ndarray
    train_labels: np.ndarray
    rank_rows: np.ndarray  # positions in the test arrays to rank
    seen: SeenItems
    global_mean: float
    mean_mse: float
    popularity: dict[str, float]
    k: int

    @classmethod
    def build(cls, cfg: TrainConfig, data: Any, num_users: int, num_items: int) -> EvalSet:
        seen = SeenItems.build(data.train_users, data.train_items, num_users)
        rank_rows = sample_rows(len(data.test_users), cfg.eval_users, cfg.seed)
        tu, ti = np.asarray(data.test_users, np.int64), np.asarray(data.test_items, np.int64)
        global_mean = float(np.mean(data.train_labels, dtype=np.float64))
        tl = np.asarray(data.test_labels, np.float32)
        train_rows = sample_rows(len(data.train_labels), cfg.train_mse_rows, cfg.seed + 1)
        pop = popularity_metrics(
            data.train_items, num_items, tu[rank_rows], ti[rank_rows], seen, cfg.k
        )
        return cls(
            tu,
            ti,
            tl,
            train_rows,
            np.asarray(data.train_users, np.int64),
            np.asarray(data.train_items, np.int64),
            np.asarray(data.train_labels),
            rank_rows,
            seen,
            global_mean,
            mse(np.full(len(tl), global_mean), tl),
            pop,
            cfg.k,
        )


def _tower(model: Any, side: str, rows: np.ndarray, device: Any, chunk: int = 1 << 18) -> Any:
    """Tower outputs (eval mode) for the given rows, as one device tensor."""
    import torch

    tower = model.user_tower if side == "user" else model.item_tower
    idx = torch.as_tensor(rows, device=device)
    with torch.no_grad():
        return torch.cat(
            [tower(idx[s : s + chunk]) for s in range(0, len(idx), chunk)]
            or [torch.empty(0, model.num_emb, device=device)]
        )


def _predict(model: Any, users: np.ndarray, items: np.ndarray, device: Any) -> np.ndarray:
    out = []
    for s in range(0, len(users), 1 << 18):
        u = _tower(model, "user", users[s : s + (1 << 18)], device)
        i = _tower(model, "item", items[s : s + (1 << 18)], device)
        out.append((u * i).sum(1).cpu().numpy())
    return np.concatenate(out) if out else np.empty(0, np.float32)


def epoch_metrics(model: Any, ev: EvalSet, device: Any) -> dict[str, float]:
    tr = ev.train_rows
    item_vectors = _tower(model, "item", np.arange(model.num_items), device)
    rank = ranking_metrics(
        _tower(model, "user", ev.test_users[ev.rank_rows], device),
        item_vectors,
        ev.test_users[ev.rank_rows],
        ev.test_items[ev.rank_rows],
        ev.seen,
        ev.k,
    )
    return {
        "train_mse": mse(
            _predict(model, ev.train_users[tr], ev.train_items[tr], device), ev.train_labels[tr]
        ),
        "test_mse": mse(_predict(model, ev.test_users, ev.test_items, device), ev.test_labels),
        "mean_mse": ev.mean_mse,
        "hr": rank["hr"],
        "ndcg": rank["ndcg"],
        "k": ev.k,
    }


def item_popularity(model: Any, train_users: np.ndarray, device: Any) -> np.ndarray:
    """Per-item fallback score: the model's score for the *average training user*.

    That user's vector is the event-weighted mean of the user tower outputs, so
    the score is on the model's own scale (fallback rows sort with scored rows)
    and, under BPR, favours items many users like.
    """
    import torch

    counts = torch.as_tensor(
        np.bincount(train_users, minlength=model.num_users), dtype=torch.float32, device=device
    )
    mean_user = torch.zeros(model.num_emb, device=device)
    for s in range(0, model.num_users, 1 << 18):
        rows = np.arange(s, min(s + (1 << 18), model.num_users))
        mean_user += counts[rows] @ _tower(model, "user", rows, device)
    mean_user /= counts.sum()
    items = _tower(model, "item", np.arange(model.num_items), device)
    return (items @ mean_user).cpu().numpy().astype(np.float32)


def save_artifact(
    model: Any,
    cfg: TrainConfig,
    data: Any,
    metrics: dict,
    ev: EvalSet,
    model_dir: Path,
    device: Any,
) -> Path:
    import json

    from model.artifact import save_mfblock

    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if cfg.objective == "softmax":  # scores are p(product | user) over the catalogue
        from training.softmax import log_normalizers

        events = np.concatenate([data.train_items, data.test_items])
        counts = np.bincount(events, minlength=model.num_items)
        users = _tower(model, "user", np.arange(model.num_users), device) / cfg.temperature
        items = _tower(model, "item", np.arange(model.num_items), device)
        weights["user_log_normalizer"] = log_normalizers(users, items, counts, cfg.seed)
        weights["item_popularity"] = counts / max(counts.sum(), 1)
        score = {"kind": "probability", "temperature": cfg.temperature}
        popularity_doc = "share of all events that name the product"
    else:
        weights["item_popularity"] = item_popularity(model, ev.train_users, device)
        score = {"kind": "raw"}
        popularity_doc = "model score of the event-weighted mean training user for the item"
    save_mfblock(
        model_dir,
        weights,
        data.user_ids,
        data.product_ids,
        architecture={
            "num_users": model.num_users,
            "num_items": model.num_items,
            "num_emb": model.num_emb,
            "dropout_p": model.dropout_p,
        },
        objective=cfg.objective,
        init=cfg.init,
        train_config=asdict(cfg),
        metrics=metrics,
        global_mean=ev.global_mean,
        score=score,
        item_popularity=popularity_doc,
        data_stats=getattr(data, "stats", {}),
    )
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(metrics["epochs"], metrics["popularity"], model_dir / "curves.png")
    return model_dir
