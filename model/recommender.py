"""The servable recommender: precomputed towers, vectorised id lookups.

Whatever produced the weights (recsql training, or the seed's MXNet code), a
loaded MFBlock becomes a `Recommender`: the Dense+ReLU towers are applied once
at load time, so scoring a pair is one row gather and one dot product, and
top-K is one matrix-vector product.

Scores. A softmax-trained model (the default) scores a pair with the probability of
the product among the whole catalogue for that user, p(i | u) = exp(u.i / T - log Z_u),
with each user's log Z_u stored in the artifact (`user_log_normalizer`); the user
vectors are kept divided by T so that u.i is the logit. Models trained with mse (the
seed's) or bpr score with the raw dot product u.i: mse estimates the event weight
(view 1 ... purchase 4), bpr's scale means nothing beyond the order.

A history model (model/history.py) reads its users from their recent events: the user
vectors are the tower over each user's events as of training, and every product a user
touched gets the repeat term's bonus on its logit (`bonus`), in pair scores, top-K and the
normaliser alike. A user without a row is read from the events a request sends by the same
function (`read_users`); older models fold such a history in (`fold_in`).

Similar products: the cosine between two products' item vectors (the item tower's outputs,
the vectors the dot product uses), in [0, 1] since they are ReLU outputs; 0 when either
vector is zero (`similarity`, `top_similar`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from model.history import Bonus, HistoryModel, HistoryTower, RecentEvents, RepeatTerm

FALLBACKS = ("null", "mean", "popularity")
FOLD_IN_STEPS = 10  # L-BFGS-B iterations for a history's user vector
FOLD_IN_PRIOR = 0.1  # strength of the pull towards the mean user vector


def best_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the `k` largest finite scores, best first.

    One pass over the scores instead of a partition of all of them: the k-th best of a
    strided sample is a lower bound on the k-th best overall, so every winner scores at
    least that, and only the few that do are partitioned. A full partition when the
    sample holds fewer than k finite scores (most of the catalogue excluded).
    """
    n = len(scores)
    if k <= 0 or n == 0:
        return np.empty(0, np.int64)
    stride = int(np.sqrt(n / k))  # sample and survivors both about sqrt(n k)
    if stride >= 2:
        sample = scores[::stride]
        if len(sample) > k:
            bound = np.partition(sample, len(sample) - k)[len(sample) - k]
            if np.isfinite(bound):
                pool = np.flatnonzero(scores >= bound)
                return pool[_best_first(scores[pool], k)]
    pool = np.flatnonzero(np.isfinite(scores))
    return pool[_best_first(scores[pool], k)]


def _best_first(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(k)
    return part[np.argsort(-scores[part], kind="stable")]


@dataclass(frozen=True)
class FoldIn:
    """A user read from a history: the vector, its log normaliser, the products it knows of,
    and (history models) the repeat term's bonus: product rows and values."""

    vector: np.ndarray
    log_normalizer: float | None
    known_items: int
    bonus: tuple[np.ndarray, np.ndarray] | None = None


def _logsumexp(logits: np.ndarray) -> float:
    # not scipy.special.logsumexp: ~10x slower per call on a catalogue-sized vector
    # (145 against 13 us on 2,857 items), and this runs inside the L-BFGS objective
    top = float(logits.max())
    return top + float(np.log(np.exp(logits - top).sum()))


def _solve_softmax_user(
    items: np.ndarray, history: np.ndarray, prior: np.ndarray, start: np.ndarray, steps: int
) -> np.ndarray:
    """argmax_v>=0 mean_h log softmax(items @ v)[h] - FOLD_IN_PRIOR/2 * |v - prior|^2."""
    from scipy.optimize import minimize

    target = items[history].mean(0)

    def loss(v: np.ndarray) -> tuple[float, np.ndarray]:
        v32 = v.astype(np.float32)
        logits = items @ v32
        lse = _logsumexp(logits)
        p = np.exp(logits - np.float32(lse))
        diff = v32 - prior
        value = lse - float(target @ v32) + 0.5 * FOLD_IN_PRIOR * float(diff @ diff)
        grad = p @ items - target + np.float32(FOLD_IN_PRIOR) * diff  # float32 throughout
        return value, grad.astype(np.float64)

    result = minimize(
        loss,
        np.maximum(start, 0.0).astype(np.float64),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, None)] * len(start),
        options={"maxiter": steps},
    )
    return result.x.astype(np.float32)


def _add_bonus(
    scores: np.ndarray, item_rows: np.ndarray | None, items: np.ndarray, values: np.ndarray
) -> None:
    """scores += values at `items` (product rows); `item_rows`: the sorted rows `scores`
    covers (None: every row)."""
    if item_rows is None:
        scores[items] += values
        return
    at = np.minimum(np.searchsorted(item_rows, items), max(len(item_rows) - 1, 0))
    hit = (item_rows[at] == items) if len(item_rows) else np.zeros(len(items), bool)
    scores[at[hit]] += values[hit]


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
    # softmax models: log sum_j exp(u . i_j) per user row; scores are then probabilities
    user_log_normalizer: np.ndarray | None = None
    history: HistoryModel | None = None  # history models: reads a user from their events
    bonus: Bonus | None = None  # history models: the repeat term of each user row's products
    events: RecentEvents | None = None  # history models: each user row's events as of training

    kind = "mfblock"

    @classmethod
    def from_weights(
        cls,
        weights: dict[str, np.ndarray],
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        user_rows: np.ndarray | None = None,
        item_rows: np.ndarray | None = None,
        temperature: float | None = None,
        repeat: RepeatTerm | None = None,
        **kwargs: Any,
    ) -> Recommender:
        """`temperature` set: a softmax model, whose weights carry `user_log_normalizer`;
        `repeat` set: a history model, whose weights carry each user's `events.*`."""
        if repeat is not None:
            events = RecentEvents(
                weights["events.indptr"],
                weights["events.items"],
                weights["events.types"],
                weights["events.times"],
            )
            history = HistoryModel(
                HistoryTower(weights["history_position"], weights["history_type"]),
                weights["item_embeddings.weight"].astype(np.float32, copy=False),
                weights["dense_user.weight"].astype(np.float32, copy=False),
                weights["dense_user.bias"].astype(np.float32, copy=False),
                1.0 if temperature is None else float(temperature),
                repeat,
            )
            user_vectors = history.user_vectors(events)  # already divided by the temperature
            kwargs.update(history=history, bonus=repeat.bonus(events), events=events)
        else:
            user_vectors = relu_tower(
                weights["user_embeddings.weight"],
                weights["dense_user.weight"],
                weights["dense_user.bias"],
            )
            if temperature is not None:
                user_vectors /= np.float32(temperature)  # u . i is now the softmax logit
        if temperature is not None:
            kwargs["user_log_normalizer"] = weights["user_log_normalizer"]
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

    @property
    def probabilities(self) -> bool:
        return self.user_log_normalizer is not None

    def score_rows(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        ok = (u >= 0) & (i >= 0)
        out = np.full(u.shape, np.nan, dtype=np.float32)
        if not ok.all():
            u, i = u[ok], i[ok]
        dots = np.einsum("ij,ij->i", self.user_vectors[u], self.item_vectors[i])
        if self.bonus is not None:
            dots += self.bonus.lookup(u, i)
        if self.probabilities:
            dots = self._to_probability(dots, self.user_log_normalizer[u])
        if ok.all():
            return dots
        out[ok] = dots
        return out

    @staticmethod
    def _to_probability(logits: np.ndarray, log_normalizer: Any) -> np.ndarray:
        # min(.., 0): a sampled normaliser may fall a little short; p never exceeds 1
        return np.exp(np.minimum(logits - log_normalizer, 0.0)).astype(np.float32)

    def fallback_scores(self, product_ids: np.ndarray, policy: str) -> np.ndarray:
        """Scores for pairs the model cannot score, under a fallback policy."""
        if policy == "mean":  # a probability model's mean score is 1 / catalogue size
            mean = 1.0 / max(len(self.items), 1) if self.probabilities else self.global_mean
            return np.full(len(product_ids), mean, dtype=np.float32)
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
        normalizer = self.user_log_normalizer[row] if self.probabilities else None
        bonus = self.bonus.row(row) if self.bonus is not None else None
        return self.rank_vector(self.user_vectors[row], k, candidates, exclude, normalizer, bonus)

    def rank_vector(
        self,
        vector: np.ndarray | None,
        k: int,
        candidates: np.ndarray | None = None,
        exclude: np.ndarray | None = None,
        log_normalizer: float | None = None,
        bonus: tuple[np.ndarray, np.ndarray] | None = None,
        items: np.ndarray | None = None,
        normalize: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """top_k for a user vector (a known user's row, or one read from a history), plus
        `bonus` (product rows, values) on those products' scores; vector None: by item
        popularity (the fallback ranking), scored as the fallback is. `items`: the table
        the vector is scored against (default item_vectors). `normalize`: a softmax
        model's read without its normaliser (`read_users(..., normalize=False)`): take it
        from the catalogue's scores computed here, not in a second pass."""
        items = self.item_vectors if items is None else items
        if candidates is None and len(self.items) < len(self.item_vectors):
            candidates = self.items.sorted_ids  # rows no id names cannot be returned
        if vector is None:
            table = self.item_popularity
            if table is None:
                table = np.zeros(len(self.item_vectors), np.float32)
            log_normalizer = None
        if candidates is not None:
            item_rows = self.items.rows(candidates)
            item_rows = np.unique(item_rows[item_rows >= 0])
            scores = items[item_rows] @ vector if vector is not None else table[item_rows]
        else:
            item_rows = None
            scores = items @ vector if vector is not None else table.copy()
        if bonus is not None and vector is not None and len(bonus[0]):
            _add_bonus(scores, item_rows, *bonus)
        if normalize and vector is not None and self.probabilities:
            whole = item_rows is None and items is self.item_vectors  # scores is every logit
            log_normalizer = self._log_normalizer(vector, bonus, scores if whole else None)
        if exclude is not None and len(exclude):
            ex = self.items.rows(exclude)
            ex = ex[ex >= 0]
            if item_rows is None:
                scores[ex] = -np.inf
            else:
                scores[np.isin(item_rows, ex)] = -np.inf
        best = best_k(scores, k)
        rows = best if item_rows is None else item_rows[best]
        top = scores[best].astype(np.float32)
        if log_normalizer is not None:
            top = self._to_probability(top, log_normalizer)
        return self.items.ids_by_row[rows], top

    @cached_property
    def item_norms(self) -> np.ndarray:
        """Each item vector's length (float64)."""
        vectors = self.item_vectors.astype(np.float64)
        return np.sqrt(np.einsum("ij,ij->i", vectors, vectors))

    @cached_property
    def unit_item_vectors(self) -> np.ndarray:
        """item_vectors scaled to length 1 (a zero vector stays zero): cosine is a dot."""
        norms = self.item_norms
        return (self.item_vectors / np.where(norms > 0, norms, 1.0)[:, None]).astype(np.float32)

    def similarity(self, product_a: np.ndarray, product_b: np.ndarray) -> np.ndarray:
        """Cosine between the item vectors of each pair of products, in float64 then
        rounded (as the in-server function computes it); NaN where either is unknown, 0
        where either vector is zero."""
        a = self.items.rows(product_a)
        b = self.items.rows(product_b)
        ok = (a >= 0) & (b >= 0)
        out = np.full(a.shape, np.nan, np.float32)
        a, b = a[ok], b[ok]
        dots = np.einsum("ij,ij->i", self.item_vectors[a].astype(np.float64), self.item_vectors[b])
        norms = self.item_norms[a] * self.item_norms[b]
        cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
        out[ok] = np.clip(cosine, -1.0, 1.0)
        return out

    def top_similar(
        self,
        product_ids: np.ndarray,
        k: int,
        candidates: np.ndarray | None = None,
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The `k` products most similar to `product_ids`, best first, scored by their mean
        cosine to the distinct known ones (unknown ids are skipped); the query products
        themselves are never returned. None when the model knows none of them."""
        product_ids = np.asarray(product_ids, np.int64)
        rows = np.unique(self.items.rows(product_ids))
        rows = rows[rows >= 0]
        if not len(rows):
            return None
        query = self.unit_item_vectors[rows].mean(0)  # unit . mean(q) = mean(unit . q)
        exclude = product_ids if exclude is None else np.concatenate([exclude, product_ids])
        return self.rank_vector(query, k, candidates, exclude, items=self.unit_item_vectors)

    def _log_normalizer(
        self,
        vector: np.ndarray,
        bonus: tuple[np.ndarray, np.ndarray] | None,
        logits: np.ndarray | None = None,
    ) -> float:
        """log sum_i exp(score_i) over the catalogue, bonus included; `logits`: those scores
        already computed (with the bonus) by the caller."""
        if logits is None:
            logits = self.item_vectors @ vector
            if bonus is not None and len(bonus[0]):
                logits[bonus[0]] += bonus[1]
        return _logsumexp(logits)

    def read_users(self, events: RecentEvents, normalize: bool = True) -> list[FoldIn | None]:
        """Each user of `events` (product rows, -1 unknown) as the model reads them; None for
        a user with no product the model knows. History models: the tower, the repeat term
        and (`normalize`) the exact normaliser over the catalogue, which a top-K can take
        from its own pass instead (rank_vector's `normalize`); others: `fold_in`."""
        if self.history is None:
            return [
                self.fold_in(self.items.ids_by_row[items[items >= 0]])
                for items in np.split(events.items, events.indptr[1:-1])
            ]
        vectors = self.history.user_vectors(events)
        bonus = self.history.repeat.bonus(events)
        out: list[FoldIn | None] = []
        for row, vector in enumerate(vectors):
            items = events.items[events.indptr[row] : events.indptr[row + 1]]
            known = int((items >= 0).sum())
            if not known:
                out.append(None)
                continue
            touched = bonus.row(row)
            normalizer = None
            if self.probabilities and normalize:
                normalizer = self._log_normalizer(vector, touched)
            out.append(FoldIn(vector, normalizer, known, touched))
        return out

    def read_fresh(
        self, user_ids: np.ndarray, fresh: RecentEvents, normalize: bool = True
    ) -> dict[int, FoldIn]:
        """The users of `fresh` (row r is user id user_ids[r]; product rows, -1 unknown, in
        time order) as the model reads them once those events are added, for the users whose
        reading changes. History models: a known user from their events as of training
        followed by the fresh ones (in time order, ties: training's first; the last
        `recent_events`), a user the model does not know from the fresh ones alone. Models
        with a per-user embedding: a known user keeps their row (the events do not move a
        trained embedding), an unknown one is folded in. Users none of whose events name a
        product the model knows are left out."""
        user_ids = np.asarray(user_ids, np.int64)
        rows = self.users.rows(user_ids)
        if self.history is None or self.events is None:
            unknown = np.flatnonzero(rows < 0)
            if not len(unknown):
                return {}
            reads = self.read_users(fresh.subset(unknown), normalize)
            return {
                int(user_ids[u]): read
                for u, read in zip(unknown, reads, strict=True)
                if read is not None
            }
        known = np.flatnonzero(rows >= 0)
        stored = self.events.subset(rows[known])
        users = np.concatenate([known[stored.user_rows()], fresh.user_rows()])
        times = np.concatenate([stored.times, fresh.times])
        order = np.lexsort((np.arange(len(users)), times, users))  # stable: training's first
        merged = RecentEvents.build(
            users[order],
            np.concatenate([stored.items, fresh.items])[order],
            np.concatenate([stored.types, fresh.types])[order],
            times[order],
            len(user_ids),
            self.recent_events,
        )
        reads = self.read_users(merged, normalize)
        return {int(user_ids[u]): read for u, read in enumerate(reads) if read is not None}

    def score_read(self, user: FoldIn, item_rows: np.ndarray) -> np.ndarray:
        """Scores of one user read from events (`read_users`, `read_fresh`) for product rows
        (-1: unknown, NaN), as `score_rows` scores a user row: the dot product, the repeat
        term's bonus, the probability."""
        item_rows = np.asarray(item_rows, np.int64)
        ok = item_rows >= 0
        out = np.full(item_rows.shape, np.nan, np.float32)
        logits = self.item_vectors[item_rows[ok]] @ user.vector
        if user.bonus is not None and len(user.bonus[0]):
            touched, values = user.bonus
            at = np.minimum(np.searchsorted(touched, item_rows[ok]), len(touched) - 1)
            logits += np.where(touched[at] == item_rows[ok], values[at], 0.0).astype(np.float32)
        if user.log_normalizer is not None:
            logits = self._to_probability(logits, user.log_normalizer)
        out[ok] = logits
        return out

    def fold_in(self, product_ids: np.ndarray, steps: int = FOLD_IN_STEPS) -> FoldIn | None:
        """A user vector from the products of a user's recent events (oldest first; unknown
        ids are skipped); None when the model knows none of them.

        Softmax models: a few L-BFGS-B steps on the user vector with every item fixed,
        maximising the mean log-probability of the history under the model's own softmax,
        with the user vector kept >= 0 (it is a ReLU output) and pulled towards the mean
        user by an L2 term. Other objectives, or steps=0: the mean of the history's item
        vectors, scaled to the mean user vector's norm (a rank-preserving guess).
        """
        rows = self.items.rows(np.asarray(product_ids, np.int64))
        rows = rows[rows >= 0]
        if not len(rows):
            return None
        prior = self.mean_user_vector
        start = self.item_vectors[rows].mean(0)
        norm = float(np.linalg.norm(start))
        if norm > 0:
            start = start * (float(np.linalg.norm(prior)) / norm)
        if not self.probabilities or steps <= 0:
            vector = start.astype(np.float32)
        else:
            vector = _solve_softmax_user(self.item_vectors, rows, prior, start, steps)
        normalizer = _logsumexp(self.item_vectors @ vector) if self.probabilities else None
        return FoldIn(vector, normalizer, len(rows))

    @property
    def recent_events(self) -> int | None:
        """Events per user a history model reads (the artifact's N); None: any number."""
        n = self.info.get("recent_events")
        return n if isinstance(n, int) and n > 0 else None

    @cached_property
    def mean_user_vector(self) -> np.ndarray:
        return self.user_vectors.mean(0) if len(self.user_vectors) else np.zeros(0, np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_users": int(self.user_vectors.shape[0]),
            "num_items": int(self.item_vectors.shape[0]),
            "num_emb": int(self.user_vectors.shape[1]),
            "inputs": ["user_id", "product_id"],
            **{
                k: v
                for k, v in self.info.items()
                if k in ("objective", "source", "format_version", "user_tower", "recent_events")
            },
        }
