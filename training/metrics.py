"""Held-out metrics: HR@K and NDCG@K of any scorer, test MSE, the popularity baseline.

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

`ties="against"` counts every tied item above the held-out one instead (the benchmark's
rule). `rank_metrics` ranks any scorer (the simple rules of training/baselines.py);
`ranking_metrics` the dot products of user and item vectors, plus a history model's
repeat term. Ranking costs (users x items) dot products, so training ranks a seeded sample
of `eval_users` test users (0 = all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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
    bonus: Any = None,
    ties: str = "random",
) -> dict[str, float]:
    """HR@K and NDCG@K of scores user_vectors @ item_vectors.T (+ `bonus`).

    `user_vectors[j]` belongs to user row `users[j]`, whose held-out item is
    `test_items[j]`. Vectors may be numpy arrays or torch tensors (any device).
    `bonus`: a model/history.py Bonus whose row j is added to user j's scores (a history
    model's repeat term). `ties`: "random" (the expected metric over the tie orders, as the
    module docstring says) or "against" (every tied item ranks above the held-out one).
    """
    import torch

    uv = torch.as_tensor(user_vectors)
    iv = torch.as_tensor(item_vectors, device=uv.device, dtype=uv.dtype)

    def scores(rows: np.ndarray) -> Any:
        out = uv[rows] @ iv.T
        if bonus is not None:
            _add_bonus(out, bonus, rows)
        return out

    return rank_metrics(scores, users, test_items, seen, k, chunk, ties)


def _add_bonus(scores: Any, bonus: Any, rows: np.ndarray) -> None:
    import torch

    counts = bonus.indptr[rows + 1] - bonus.indptr[rows]
    at = (
        np.repeat(bonus.indptr[rows], counts)
        + np.arange(counts.sum())
        - np.repeat(np.cumsum(counts) - counts, counts)
    )
    dev = scores.device
    r = torch.as_tensor(np.repeat(np.arange(len(rows)), counts), device=dev)
    c = torch.as_tensor(bonus.items[at].astype(np.int64), device=dev)
    scores[r, c] += torch.as_tensor(bonus.values[at], device=dev, dtype=scores.dtype)


def rank_metrics(
    scores: Any,
    users: np.ndarray,
    test_items: np.ndarray,
    seen: SeenItems,
    k: int = 10,
    chunk: int = 1024,
    ties: str = "random",
    per_user: bool = False,
) -> dict[str, Any]:
    """HR@K and NDCG@K of any scorer: `scores(rows)` gives the (len(rows), items) scores of
    the users at positions `rows` of `users`, as a new torch tensor or numpy array.
    `per_user`: also each user's hit and gain ("hits", "gains" arrays), for the noise."""
    import torch

    prefix = _discount_prefix(k)
    hits, gains = [], []
    for s in range(0, len(users), chunk):
        rows = np.arange(s, min(s + chunk, len(users)))
        block = torch.as_tensor(scores(rows))  # fresh: excluded items are set in place
        pos, items = seen.pairs(users[rows])
        keep = items != test_items[rows][pos]
        dev = block.device
        block[
            torch.as_tensor(pos[keep], device=dev), torch.as_tensor(items[keep], device=dev)
        ] = -torch.inf
        target = block[
            torch.arange(len(rows), device=dev), torch.as_tensor(test_items[rows], device=dev)
        ]
        greater = (block > target[:, None]).sum(1).cpu().numpy()
        tied = (block == target[:, None]).sum(1).cpu().numpy() - 1
        if ties == "against":
            greater, tied = greater + tied, np.zeros_like(tied)
        lo, hi = np.minimum(greater, k), np.minimum(greater + tied + 1, k)
        hits.append((hi - lo) / (tied + 1))
        gains.append((prefix[hi] - prefix[lo]) / (tied + 1))
    if not hits:
        return {"hr": float("nan"), "ndcg": float("nan"), "users": 0}
    out: dict[str, Any] = {
        "hr": float(np.concatenate(hits).mean()),
        "ndcg": float(np.concatenate(gains).mean()),
        "users": len(users),
    }
    if per_user:
        out.update(hits=np.concatenate(hits), gains=np.concatenate(gains))
    return out


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
