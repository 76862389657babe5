"""The servable recommender: precomputed towers, vectorised id lookups.

Whatever produced the weights (recsql training, or the seed's MXNet code), a
loaded MFBlock becomes a `Recommender`: the Dense+ReLU towers are applied once
at load time, so scoring a pair is one row gather and one dot product, and
top-K is one matrix-vector product.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FALLBACKS = ("null", "mean", "popularity")


class IdIndex:
    """Maps external int64 ids to row numbers with one `searchsorted`."""

    def __init__(self, ids: np.ndarray, rows: np.ndarray | None = None) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.arange(len(ids), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[order]
        self.sorted_rows = rows[order]
        if len(ids) > 1 and np.any(self.sorted_ids[1:] == self.sorted_ids[:-1]):
            raise ValueError("the id index holds duplicate ids")
        # rows may skip table rows or exceed len(ids); -1 marks a row no id names
        size = max(len(ids), int(rows.max()) + 1 if len(rows) else 0)
        self.ids_by_row = np.full(size, -1, dtype=np.int64)
        self.ids_by_row[rows] = ids

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row number of each id, -1 where the id is unknown."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.sorted_ids) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self.sorted_ids, ids)
        pos_clipped = np.minimum(pos, len(self.sorted_ids) - 1)
        found = self.sorted_ids[pos_clipped] == ids
        return np.where(found, self.sorted_rows[pos_clipped], -1)


def relu_tower(embeddings: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """relu(E @ W.T + b): one Dense+ReLU applied to every row of a table."""
    out = embeddings.astype(np.float32, copy=False) @ weight.astype(np.float32, copy=False).T
    out += bias.astype(np.float32, copy=False)
    np.maximum(out, 0.0, out=out)
    return out


@dataclass
class Recommender:
    """user/item vectors after their towers, plus the id indexes."""

    user_vectors: np.ndarray  # (num_users, num_emb) float32
    item_vectors: np.ndarray  # (num_items, num_emb) float32
    users: IdIndex
    items: IdIndex
    global_mean: float = 0.0
    item_popularity: np.ndarray | None = None  # (num_items,) float32, fallback scores
    info: dict[str, Any] = field(default_factory=dict)

    kind = "mfblock"

    @classmethod
    def from_weights(
        cls,
        weights: dict[str, np.ndarray],
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        user_rows: np.ndarray | None = None,
        item_rows: np.ndarray | None = None,
        **kwargs: Any,
    ) -> Recommender:
        user_vectors = relu_tower(
            weights["user_embeddings.weight"],
            weights["dense_user.weight"],
            weights["dense_user.bias"],
        )
        item_vectors = relu_tower(
            weights["item_embeddings.weight"],
            weights["dense_item.weight"],
            weights["dense_item.bias"],
        )
        return cls(
            user_vectors=np.ascontiguousarray(user_vectors),
            item_vectors=np.ascontiguousarray(item_vectors),
            users=IdIndex(user_ids, user_rows),
            items=IdIndex(item_ids, item_rows),
            **kwargs,
        )

    def score(self, user_ids: np.ndarray, product_ids: np.ndarray) -> np.ndarray:
        """Score pairs; NaN where the user or the product is unknown."""
        u = self.users.rows(user_ids)
        i = self.items.rows(product_ids)
        return self.score_rows(u, i)

    def score_rows(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        ok = (u >= 0) & (i >= 0)
        out = np.full(u.shape, np.nan, dtype=np.float32)
        if ok.all():
            return np.einsum("ij,ij->i", self.user_vectors[u], self.item_vectors[i])
        out[ok] = np.einsum("ij,ij->i", self.user_vectors[u[ok]], self.item_vectors[i[ok]])
        return out

    def fallback_scores(self, product_ids: np.ndarray, policy: str) -> np.ndarray:
        """Scores for pairs the model cannot score, under a fallback policy."""
        if policy == "mean":
            return np.full(len(product_ids), self.global_mean, dtype=np.float32)
        if policy == "popularity" and self.item_popularity is not None:
            rows = self.items.rows(product_ids)
            out = np.full(len(product_ids), self.global_mean, dtype=np.float32)
            known = rows >= 0
            out[known] = self.item_popularity[rows[known]]
            return out
        if policy == "popularity":
            return np.full(len(product_ids), self.global_mean, dtype=np.float32)
        return np.full(len(product_ids), np.nan, dtype=np.float32)

    def top_k(
        self,
        user_id: int,
        k: int = 10,
        candidates: np.ndarray | None = None,
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best `k` product ids for one user, best first, with their scores.

        `candidates` restricts the search to those products (unknown ones are
        ignored); `exclude` removes products (e.g. those the user already had).
        An unknown user gets empty arrays.
        """
        row = int(self.users.rows(np.array([user_id]))[0])
        if row < 0 or k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if candidates is None and len(self.items) < len(self.item_vectors):
            candidates = self.items.sorted_ids  # rows no id names cannot be returned
        if candidates is not None:
            item_rows = self.items.rows(candidates)
            item_rows = np.unique(item_rows[item_rows >= 0])
            scores = self.item_vectors[item_rows] @ self.user_vectors[row]
        else:
            item_rows = None
            scores = self.item_vectors @ self.user_vectors[row]
        if exclude is not None and len(exclude):
            ex = self.items.rows(exclude)
            ex = ex[ex >= 0]
            if item_rows is None:
                scores[ex] = -np.inf
            else:
                scores[np.isin(item_rows, ex)] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        if k == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        rows = best if item_rows is None else item_rows[best]
        return self.items.ids_by_row[rows], scores[best].astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_users": int(self.user_vectors.shape[0]),
            "num_items": int(self.item_vectors.shape[0]),
            "num_emb": int(self.user_vectors.shape[1]),
            "inputs": ["user_id", "product_id"],
            **{
                k: v for k, v in self.info.items() if k in ("objective", "source", "format_version")
            },
        }
