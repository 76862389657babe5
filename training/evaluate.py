"""Held-out evaluation: test MSE, HR@K and NDCG@K, and the popularity baseline.

Protocol (leave-last-out, full ranking): each user's last event is the test
row. For a user, every item is scored; the user's *training* items are removed
from the candidates, except the held-out item itself (REES46 users often come
back to an item they viewed before, and dropping it would make those users
unscoreable); the test item's rank among the remaining candidates gives
HR@K = [rank < K] and NDCG@K = 1/log2(rank + 2) when rank < K.

Ties are broken uniformly at random, in expectation: a user whose test item
ties with `t` other candidates and is beaten by `g` gets the mean of the
metric over ranks g..g+t. A model that scores every item the same (a dead
ReLU tower) therefore gets the random-guess score, not a perfect one.

Ranking costs (users x items) dot products, so it runs on a seeded sample of
`eval_users` test users (0 = all). `recsql evaluate` runs the same code on a
saved model directory.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import ArtifactError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeenItems:
    """Each user's training items as CSR: items[indptr[u]:indptr[u + 1]]."""

    indptr: np.ndarray
    items: np.ndarray

    @classmethod
    def build(cls, train_users: np.ndarray, train_items: np.ndarray, num_users: int) -> SeenItems:
        order = np.argsort(train_users, kind="stable")
        counts = np.bincount(train_users, minlength=num_users)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(indptr, np.asarray(train_items, np.int64)[order])

    def pairs(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `users`, item) for every training item of those users."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lens = ends - starts
        pos = np.repeat(np.arange(len(users)), lens)
        offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        return pos, self.items[np.repeat(starts, lens) + offsets]


def sample_rows(n: int, eval_users: int, seed: int) -> np.ndarray:
    """A seeded, sorted sample of `eval_users` of n test rows (all when 0 or >= n)."""
    if eval_users <= 0 or eval_users >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=eval_users, replace=False))


def _discount_prefix(k: int) -> np.ndarray:
    """prefix[r] = sum of 1/log2(q + 2) for q < r, r = 0..k."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])


def ranking_metrics(
    user_vectors: Any,
    item_vectors: Any,
    users: np.ndarray,
    test_items: np.ndarray,
    seen: SeenItems,
    k: int = 10,
    chunk: int = 1024,
) -> dict[str, float]:
    """HR@K and NDCG@K of scores user_vectors @ item_vectors.T.

    `user_vectors[j]` belongs to user row `users[j]`, whose held-out item is
    `test_items[j]`. Vectors may be numpy arrays or torch tensors (any device).
    """
    import torch

    uv = torch.as_tensor(user_vectors)
    iv = torch.as_tensor(item_vectors, device=uv.device, dtype=uv.dtype)
    prefix = _discount_prefix(k)
    hits, gains = [], []
    for s in range(0, len(users), chunk):
        rows = np.arange(s, min(s + chunk, len(users)))
        scores = uv[rows] @ iv.T
        pos, items = seen.pairs(users[rows])
        keep = items != test_items[rows][pos]
        dev = scores.device
        scores[
            torch.as_tensor(pos[keep], device=dev), torch.as_tensor(items[keep], device=dev)
        ] = -torch.inf
        target = scores[
            torch.arange(len(rows), device=dev), torch.as_tensor(test_items[rows], device=dev)
        ]
        greater = (scores > target[:, None]).sum(1).cpu().numpy()
        ties = (scores == target[:, None]).sum(1).cpu().numpy() - 1
        lo, hi = np.minimum(greater, k), np.minimum(greater + ties + 1, k)
        hits.append((hi - lo) / (ties + 1))
        gains.append((prefix[hi] - prefix[lo]) / (ties + 1))
    if not hits:
        return {"hr": float("nan"), "ndcg": float("nan"), "users": 0}
    return {
        "hr": float(np.concatenate(hits).mean()),
        "ndcg": float(np.concatenate(gains).mean()),
        "users": len(users),
    }


def popularity_metrics(
    train_items: np.ndarray,
    num_items: int,
    users: np.ndarray,
    test_items: np.ndarray,
    seen: SeenItems,
    k: int = 10,
) -> dict[str, float]:
    """The popularity baseline: every user gets items ranked by training event count."""
    counts = np.bincount(train_items, minlength=num_items).astype(np.float32)
    ones = np.ones((len(users), 1), np.float32)
    return ranking_metrics(ones, counts[:, None], users, test_items, seen, k)


def mse(pred: np.ndarray, labels: np.ndarray) -> float:
    if not len(labels):
        return float("nan")
    return float(np.mean((np.asarray(pred, np.float64) - labels) ** 2))


def plot_curves(history: list[dict[str, Any]], baseline: dict[str, float], path: Path) -> None:
    """Per-epoch MSE (train, test, mean predictor) and HR/NDCG vs popularity, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("train_mse", "train MSE"),
        ("test_mse", "test MSE"),
        ("mean_mse", "mean predictor (test)"),
    ):
        left.plot(epochs, [h[key] for h in history], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="MSE", title="regression")
    left.legend()
    for key, style in (("hr", "-"), ("ndcg", "--")):
        right.plot(epochs, [h[key] for h in history], style, marker="o", label=f"model {key}")
        right.axhline(baseline[key], linestyle=style, color="grey", label=f"popularity {key}")
    right.set(xlabel="epoch", ylabel=f"@{history[0]['k'] if history else 10}", title="ranking")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_model_dir(
    model_dir: Path, data: Any, k: int = 10, eval_users: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """Evaluate a saved MFBlock on prepared events, matched by external ids."""
    from model.artifact import load_model
    from model.recommender import Recommender

    model = load_model(model_dir)
    if not isinstance(model, Recommender):
        raise ArtifactError(f"{model_dir}: evaluate supports MFBlock models, not {model.kind!r}")
    users = model.users.rows(data.user_ids[data.test_users])
    items = model.items.rows(data.product_ids[data.test_items])
    known = (users >= 0) & (items >= 0)
    if not known.any():
        raise DataError("no held-out event has a user and product the model knows")
    tu = model.users.rows(data.user_ids[data.train_users])
    ti = model.items.rows(data.product_ids[data.train_items])
    ok = (tu >= 0) & (ti >= 0)
    seen = SeenItems.build(tu[ok], ti[ok], len(model.users))
    users, items, labels = users[known], items[known], data.test_labels[known]
    rows = sample_rows(len(users), eval_users, seed)
    pred = model.score_rows(users, items)
    ranking = ranking_metrics(
        model.user_vectors[users[rows]], model.item_vectors, users[rows], items[rows], seen, k
    )
    popularity = popularity_metrics(ti[ok], len(model.items), users[rows], items[rows], seen, k)
    return {
        "model_dir": str(model_dir),
        "objective": model.info.get("objective"),
        "k": k,
        "test_rows": int(known.sum()),
        "test_rows_unknown": int((~known).sum()),
        # MSE against event weights means something for the mse objective only
        "test_mse": mse(pred, labels) if model.info.get("objective") in (None, "mse") else None,
        "mean_mse": mse(np.full(len(labels), model.global_mean), labels),
        "model": ranking,
        "popularity": popularity,
    }


def format_table(result: dict[str, Any]) -> str:
    k = result["k"]
    lines = [f"{'':<16}{'HR@' + str(k):>10}{'NDCG@' + str(k):>10}{'test MSE':>10}"]
    m, p = result["model"], result["popularity"]
    name = f"mfblock ({result.get('objective') or '?'})"
    test_mse = "-" if result["test_mse"] is None else f"{result['test_mse']:.4f}"
    lines.append(f"{name:<16}{m['hr']:>10.4f}{m['ndcg']:>10.4f}{test_mse:>10}")
    lines.append(f"{'popularity':<16}{p['hr']:>10.4f}{p['ndcg']:>10.4f}{'-':>10}")
    lines.append(f"{'mean predictor':<16}{'-':>10}{'-':>10}{result['mean_mse']:>10.4f}")
    lines.append(f"({m['users']} users ranked over all items; {result['test_rows']} test rows)")
    return "\n".join(lines)


def run_evaluate_command(args: argparse.Namespace) -> int:
    from training.events import load_events

    if args.k <= 0:
        raise DataError(f"--k must be > 0, not {args.k}")
    data = load_events(args.inputs, args.min_events, progress=not args.no_progress)
    result = evaluate_model_dir(args.model_dir, data, args.k, args.eval_users, args.seed)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
