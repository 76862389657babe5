"""Train MFBlock on prepared events. Reads top to bottom, like nanoGPT's train.py.

    config (dataclass + CLI / SageMaker overrides) -> data on the device -> model
    -> per epoch: shuffled slices, one fused step per batch -> held-out metrics
    -> artifact (weights, ids, manifest with the config) + metrics.json + curves.png

Settings are in training/config.py, the per-batch step in training/steps.py, the
held-out metrics and what a run writes in training/results.py.

Default init ("normal"): MFBlock's N(0, 0.1^2) embeddings and He-uniform Dense
weights, plus tower biases set to sqrt(mean label / num_embeddings), so the
first predictions average about the mean label (like setting an output bias to
the target mean) instead of starting near 0. `init="seed"` is left untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import DataError
from training.config import TrainConfig, resolve_device
from training.history import Sequences
from training.results import EvalSet, epoch_metrics, run_metrics, save_artifact
from training.steps import FusedStep, make_step

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, data: Any, model_dir: Path | None, progress: bool = True) -> dict:
    """Train on PreparedEvents; write the artifact to model_dir (None: don't). Returns metrics.

    Validates on the held-out events (data.test_*) each epoch and stops after `patience`
    epochs without a better score; then, with `refit`, trains a fresh model on every event
    (training and held-out) for the best epoch count: that model is the one saved.
    """
    import torch

    device = resolve_device(cfg.device)
    if not cfg.history_length:  # the seed's training set: no earlier event of its test product
        data = data.without_test_pairs()
    ev = EvalSet.build(cfg, data, len(data.user_ids), len(data.product_ids))
    model, history, best = fit(cfg, data, device, ev, progress)
    metrics = run_metrics(cfg, history, ev, best)
    for mode, rules in metrics.get("baselines", {}).items():
        log.info(
            "simple rules, %s: %s",
            "every product" if mode == "kept" else "new products only",
            ", ".join(f"{name} {r['hr']:.4f} / {r['ndcg']:.4f}" for name, r in rules.items()),
        )
    if "verdict" in metrics:
        winning = metrics["verdict"].startswith("a simple rule wins")
        log.log(logging.WARNING if winning else logging.INFO, "%s", metrics["verdict"])
    if cfg.refit and len(data.test_users):
        started = time.perf_counter()
        model, _, _ = fit(
            dataclasses.replace(cfg, patience=0),
            _with_test_events(data),
            device,
            None,
            progress,
            stop_at=best["epoch"],
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
    cfg: TrainConfig,
    data: Any,
    device: Any,
    ev: EvalSet | None,
    progress: bool,
    stop_at: float | None = None,
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Train one model; with `ev`, evaluate every `eval_every` events (an epoch is cut into
    equal parts) and keep the best evaluation's weights. `stop_at` ends training after that
    many epochs, a fraction allowed (the refit stops where validation found the best)."""
    import torch

    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    by_user, sequences = slice(None), None
    if model.history:  # the step reads each event's window from the (user, time) order
        sequences = Sequences.build(
            data.train_users, data.train_items, data.train_labels, data.times()[0], device
        )
        by_user = sequences.order
    step = make_step(cfg, model, data, gen, sequences)
    users, items, labels = device_arrays(data, device, by_user)
    if sequences is not None:
        users = torch.arange(len(labels), device=device)  # the step takes event rows
        if cfg.train_on == "new":  # repeats are the repeat term's to learn
            keep = torch.as_tensor(sequences.first_touch(), device=device)
            users, items, labels = users[keep], items[keep], labels[keep]
    if cfg.objective == "softmax" and cfg.recency:
        weights = recency_weights(data.train_users[by_user], cfg.recency)
        labels *= torch.as_tensor(weights, device=device)
    log.info(
        "training %s: %d users, %d items, %d events on %s",
        cfg.objective,
        model.num_users,
        model.num_items,
        len(labels),
        device,
    )
    n = len(labels)
    parts = math.ceil(n / cfg.eval_every) if cfg.eval_every else 1
    stop_at = cfg.epochs if stop_at is None else stop_at
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    best_state = None
    epochs = math.ceil(stop_at)
    for epoch, start, end in _stretches(n, parts, stop_at):
        if start == 0:
            order = torch.randperm(n, device=labels.device, generator=gen)
        model.train()
        loss, seconds = run_epoch(
            step,
            cfg,
            users,
            items,
            labels,
            model.num_items,
            gen,
            f"epoch {epoch}/{epochs}" + (f" ({end * parts // n}/{parts})" if parts > 1 else ""),
            progress,
            rows=order[start:end],
        )
        if isinstance(step, FusedStep):
            step.flush()
        model.eval()
        row = {"epoch": epoch if end == n else round(epoch - 1 + end / n, 4), "train_loss": loss}
        row.update(seconds=seconds, samples_per_s=(end - start) / seconds)
        history.append(row)
        if ev is None:
            continue
        row.update(epoch_metrics(model, ev, device))
        excluded = row.get("excluded")
        log.info(
            "epoch %s: loss %.4f%s, HR@%d %.4f, NDCG@%d %.4f%s, %.0f samples/s",
            row["epoch"],
            loss,
            f", test MSE {row['test_mse']:.4f} (mean predictor {row['mean_mse']:.4f})"
            if cfg.objective == "mse"
            else "",
            cfg.k,
            row["hr"],
            cfg.k,
            row["ndcg"],
            f" (new products only: {excluded['hr']:.4f} / {excluded['ndcg']:.4f})"
            if excluded
            else "",
            row["samples_per_s"],
        )
        if not best or _better(cfg, row, best):
            best, best_at = row, len(history)
            if cfg.patience:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif cfg.patience and len(history) - best_at >= cfg.patience:
            log.info("no better held-out score for %d evaluations: stopping", cfg.patience)
            break
    if best_state is not None and best is not history[-1]:
        model.load_state_dict(best_state)
    return model, history, best or history[-1]


def _stretches(n: int, parts: int, stop_at: float) -> Iterator[tuple[int, int, int]]:
    """(epoch, start, end): the runs of training between evaluations, each epoch cut into
    `parts` equal runs, until `stop_at` epochs (a fraction allowed) have passed."""
    for epoch in range(1, math.ceil(stop_at) + 1):
        last = round((stop_at - epoch + 1) * n)  # where `stop_at` falls in this epoch
        for part in range(parts):
            start, end = part * n // parts, min((part + 1) * n // parts, last)
            if end > start:
                yield epoch, start, end


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
    """The early-stopping measure: test MSE for mse, NDCG@k for the ranking objectives; a
    history model's is the mean of its NDCG@k over every product and over new products only
    (the repeat term soon carries the first, while the towers still learn the second)."""
    if cfg.objective == "mse":
        return row["test_mse"] < best["test_mse"]
    return _ranking_score(row) > _ranking_score(best)


def _ranking_score(row: dict[str, Any]) -> float:
    if "excluded" in row:
        return (row["ndcg"] + row["excluded"]["ndcg"]) / 2
    return row["ndcg"]


def _with_test_events(data: Any) -> Any:
    """The same events with each user's held-out one moved into training (for the refit)."""
    train_times, test_times = data.times()
    return dataclasses.replace(
        data,
        train_users=np.concatenate([data.train_users, data.test_users]),
        train_items=np.concatenate([data.train_items, data.test_items]),
        train_labels=np.concatenate([data.train_labels, data.test_labels]),
        train_times=np.concatenate([train_times, test_times]),
        test_users=data.test_users[:0],
        test_items=data.test_items[:0],
        test_labels=data.test_labels[:0],
        test_times=test_times[:0],
    )


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
        history=cfg.history_length,
    )
    model.init_weights(cfg.init, generator=torch.Generator().manual_seed(cfg.seed))
    global_mean = float(np.mean(data.train_labels, dtype=np.float64))
    if cfg.init == "normal" and global_mean > 0:
        with torch.no_grad():  # start predictions near the mean label (see the docstring)
            for dense in (model.dense_user, model.dense_item):
                dense.bias.fill_((global_mean / cfg.num_embeddings) ** 0.5)
    return model


def device_arrays(data: Any, device: Any, order: Any = slice(None)) -> tuple[Any, Any, Any]:
    """Training users, items (int64) and labels (float32), in `order`, resident on `device`
    for the run."""
    import torch

    def on_device(a: np.ndarray, dtype: Any) -> Any:
        return torch.as_tensor(np.asarray(a)[order], device=device).to(dtype)

    return (
        on_device(data.train_users, torch.int64),
        on_device(data.train_items, torch.int64),
        on_device(data.train_labels, torch.float32),
    )


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
    rows: Any = None,
) -> tuple[float, float]:
    """One pass over the events `rows` in that order (default: every event, in a fresh
    random order); returns (mean loss, seconds in the loop)."""
    import torch

    from model.progress import progress_bar

    dev = labels.device
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(_loop_threads(cfg, threads))
    _sync(dev)
    start = time.perf_counter()
    perm = torch.randperm(len(labels), device=dev, generator=gen) if rows is None else rows
    n, bs = len(perm), cfg.batch_size
    u, i, y = users[perm], items[perm], labels[perm]
    neg = (
        torch.randint(num_items, (n,), device=dev, generator=gen)
        if cfg.objective == "bpr"
        else None
    )
    total = torch.zeros((), device=dev)
    bar = progress_bar(
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
