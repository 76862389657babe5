"""What a user did last, and what the model reads from it: recent events, the history tower
and the repeat term. numpy only; training/ has the same formulas in torch.

    RecentEvents   each user's last events (oldest first): product row, event type, time
    HistoryTower   the user tower's input: a weighted mean of the item embeddings of a
                   user's last `length` events, weighted by position and event type
    RepeatTerm     a learned bonus on the logit of every product the user touched, from how
                   often, how (view ... purchase) and how long before their latest event
    Bonus          the repeat term of every (user, product) pair, one sorted run per user

A history model scores u . i + bonus(u, i), where u = relu(dense_user(pooled events)):
the item tower, the dot product and the softmax stay MFBlock's; the user side is read
from the events instead of a per-user embedding, so a user the model never saw is scored
by the same function as one it did.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

import numpy as np

EVENT_TYPES = ("view", "cart", "purchase", "remove_from_cart")
TYPE_CODES = {name: code for code, name in enumerate(EVENT_TYPES)}
# seconds before the user's latest event: same session (30 min), day, week, month, quarter, older
GAP_EDGES = (1800, 86400, 7 * 86400, 30 * 86400, 90 * 86400)
GAP_BUCKETS = len(GAP_EDGES) + 1
SMALL_POOL = 2048  # events up to which HistoryTower.pooled gathers instead of a sparse product
# events back from the user's latest: the latest, the one before, 2-4, 5-19, older
POSITION_EDGES = (1, 2, 5, 20)
POSITION_BUCKETS = len(POSITION_EDGES) + 1


@dataclass(frozen=True)
class RecentEvents:
    """Each user's events, oldest first, as CSR: user r's are [indptr[r], indptr[r + 1])."""

    indptr: np.ndarray  # int64 (users + 1,)
    items: np.ndarray  # int32 product rows (-1: a product the model does not know)
    types: np.ndarray  # uint8 codes into EVENT_TYPES
    times: np.ndarray  # int64 epoch seconds

    @classmethod
    def build(
        cls,
        users: np.ndarray,
        items: np.ndarray,
        types: np.ndarray,
        times: np.ndarray,
        num_users: int,
        keep: int | None = None,
    ) -> RecentEvents:
        """From events sorted by (user, time), keeping each user's last `keep` (None: all)."""
        users = np.asarray(users, np.int64)
        counts = np.bincount(users, minlength=num_users)
        ends = np.cumsum(counts)
        if keep is not None:
            from_end = ends[users] - 1 - np.arange(len(users))
            mask = from_end < keep
            users, items, types, times = users[mask], items[mask], types[mask], times[mask]
            counts = np.minimum(counts, keep)
        return cls(
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            np.asarray(items, np.int32),
            np.asarray(types, np.uint8),
            np.asarray(times, np.int64),
        )

    @property
    def num_users(self) -> int:
        return len(self.indptr) - 1

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, users: np.ndarray) -> RecentEvents:
        """The events of `users`, which become rows 0, 1, ... in that order."""
        users = np.asarray(users, np.int64)
        starts, ends = self.indptr[users], self.indptr[users + 1]
        counts = ends - starts
        at = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return RecentEvents(indptr, self.items[at], self.types[at], self.times[at])

    def known(self) -> RecentEvents:
        """Without the events of products the model does not know (row -1)."""
        keep = self.items >= 0
        counts = np.bincount(self.user_rows()[keep], minlength=self.num_users)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return RecentEvents(indptr, self.items[keep], self.types[keep], self.times[keep])

    def user_rows(self) -> np.ndarray:
        """The user row of every event."""
        return np.repeat(np.arange(self.num_users), np.diff(self.indptr))

    def from_end(self) -> np.ndarray:
        """Every event's position counted from its user's latest (0 = the latest)."""
        return np.repeat(self.indptr[1:] - 1, np.diff(self.indptr)) - np.arange(len(self))

    def gaps(self) -> np.ndarray:
        """Seconds from every event to its user's latest event (>= 0)."""
        counts = np.diff(self.indptr)
        latest = self.times[np.maximum(self.indptr[1:] - 1, 0)]
        return np.maximum(np.repeat(latest, counts) - self.times, 0)


@dataclass(frozen=True)
class HistoryTower:
    """The user tower's input: sum_k w_k item_embedding[event_k] / sum_k w_k over the last
    `length` events with a known product, w_k = exp(position[k] + event_type[type_k]),
    k = 0 for the latest. A user with no such event gets the zero vector."""

    position: np.ndarray  # (length,) log-weights by position from the latest
    event_type: np.ndarray  # (len(EVENT_TYPES),) log-weights by event type

    @property
    def length(self) -> int:
        return len(self.position)

    def pooled(self, events: RecentEvents, item_embeddings: np.ndarray) -> np.ndarray:
        """(users, dim) float32: the tower input of every user of `events`."""
        from scipy.sparse import csr_matrix

        k = events.from_end()
        use = (k < self.length) & (events.items >= 0)
        rows = events.user_rows()[use]
        weights = np.exp(self.position[k[use]] + self.event_type[events.types[use]])
        total = np.bincount(rows, weights, minlength=events.num_users)
        weights /= total[rows]
        if len(rows) <= SMALL_POOL:  # a request's few users: scipy's set-up costs ~0.2 ms
            out = np.zeros((events.num_users, item_embeddings.shape[1]), np.float32)
            np.add.at(out, rows, item_embeddings[events.items[use]] * weights[:, None])
            return out
        mix = csr_matrix(
            (weights.astype(np.float32), (rows, events.items[use])),
            shape=(events.num_users, len(item_embeddings)),
        )
        return np.asarray(mix @ item_embeddings.astype(np.float32, copy=False), np.float32)


@dataclass(frozen=True)
class RepeatTerm:
    """bonus(u, i) = scale * log(1 + sum_e exp(weights[type_e, gap_e])) + latest[gap of the
    most recent e] + recent[position of the most recent e], over the user's events e that
    name product i; gap_e: the GAP_EDGES bucket of the time from e to the user's latest
    event; position: the POSITION_EDGES bucket of how many events back it is. Fitted on
    held-out events; a negative bonus says "not again" (a film rated once, a product in the
    open basket)."""

    scale: float
    weights: np.ndarray  # (len(EVENT_TYPES), GAP_BUCKETS)
    latest: np.ndarray  # (GAP_BUCKETS,)
    recent: np.ndarray  # (POSITION_BUCKETS,)

    def to_json(self) -> dict[str, Any]:
        return {
            "scale": float(self.scale),
            "weights": np.asarray(self.weights, float).round(6).tolist(),
            "latest": np.asarray(self.latest, float).round(6).tolist(),
            "recent": np.asarray(self.recent, float).round(6).tolist(),
            "gap_edges": list(GAP_EDGES),
            "position_edges": list(POSITION_EDGES),
            "event_types": list(EVENT_TYPES),
        }

    @classmethod
    def from_json(cls, doc: Any) -> RepeatTerm:
        if (
            not isinstance(doc, dict)
            or list(doc.get("gap_edges", ())) != list(GAP_EDGES)
            or list(doc.get("position_edges", ())) != list(POSITION_EDGES)
        ):
            raise ValueError(
                f"repeat term must be an object with gap_edges {list(GAP_EDGES)} and"
                f" position_edges {list(POSITION_EDGES)}"
            )
        weights = np.asarray(doc.get("weights"), np.float64)
        latest = np.asarray(doc.get("latest"), np.float64)
        recent = np.asarray(doc.get("recent"), np.float64)
        scale = doc.get("scale")
        if (
            weights.shape != (len(EVENT_TYPES), GAP_BUCKETS)
            or latest.shape != (GAP_BUCKETS,)
            or recent.shape != (POSITION_BUCKETS,)
        ):
            raise ValueError(
                f"repeat term weights must be {len(EVENT_TYPES)}x{GAP_BUCKETS}, latest"
                f" {GAP_BUCKETS} and recent {POSITION_BUCKETS} numbers"
            )
        if not isinstance(scale, int | float) or isinstance(scale, bool):
            raise ValueError("repeat term scale must be a number")
        finite = np.isfinite(weights).all() and np.isfinite(latest).all()
        if not (finite and np.isfinite(recent).all() and np.isfinite(scale)):
            raise ValueError("repeat term values must be finite")
        return cls(float(scale), weights, latest, recent)

    def bonus(self, events: RecentEvents) -> Bonus:
        """The bonus of every (user, product) pair in `events`."""
        pairs = EventPairs.build(events)
        mass = pairs.reduce(np.exp(self.weights[pairs.types, pairs.buckets]))
        values = self.scale * np.log1p(mass) + self.latest[pairs.latest_bucket()]
        values += self.recent[pairs.latest_position()]
        return Bonus(pairs.indptr(events.num_users), pairs.items(), values.astype(np.float32))


@dataclass(frozen=True)
class EventPairs:
    """The events of `RecentEvents` grouped by (user, product): what the repeat term reads.
    One unstable sort on a (user, product) key (a 3-key lexsort took 4x as long); what a
    pair needs of its most recent event is a minimum over the group (gap, position)."""

    users: np.ndarray  # per event, sorted by (user, product)
    item_rows: np.ndarray
    types: np.ndarray
    buckets: np.ndarray  # gap buckets
    positions: np.ndarray  # events back from the user's latest
    starts: np.ndarray  # where each (user, product) group begins

    @classmethod
    def build(cls, events: RecentEvents) -> EventPairs:
        # per event, in narrow types (a 3M-user model holds ~70M events): user, gap bucket,
        # position (both from the user's latest event, known product or not)
        users = np.repeat(np.arange(events.num_users, dtype=np.int32), np.diff(events.indptr))
        buckets = np.searchsorted(np.asarray(GAP_EDGES), events.gaps(), "right").astype(np.uint8)
        positions = np.minimum(events.from_end(), np.iinfo(np.int32).max).astype(np.int32)
        items, types = events.items, events.types
        known = items >= 0
        if not known.all():
            users, items, types = users[known], items[known], types[known]
            buckets, positions = buckets[known], positions[known]
        width = int(items.max()) + 1 if len(items) else 1
        key = users.astype(np.int64) * width + items
        order = np.argsort(key)
        key = key[order]
        first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
        del key
        return cls(
            users[order],
            items[order],
            types[order],
            buckets[order],
            positions[order],
            np.flatnonzero(first),
        )

    def reduce(self, per_event: np.ndarray) -> np.ndarray:
        """Sum of a per-event value over each pair's events."""
        if not len(self.starts):
            return np.zeros(0, per_event.dtype)
        return np.add.reduceat(per_event, self.starts)

    def latest_bucket(self) -> np.ndarray:
        """Gap bucket of each pair's most recent event (the smallest: gaps shrink with time)."""
        if not len(self.starts):
            return np.zeros(0, np.int64)
        return np.minimum.reduceat(self.buckets, self.starts).astype(np.int64)

    def latest_position(self) -> np.ndarray:
        """POSITION_EDGES bucket of each pair's most recent event."""
        if not len(self.starts):
            return np.zeros(0, np.int64)
        latest = np.minimum.reduceat(self.positions, self.starts)
        return np.searchsorted(np.asarray(POSITION_EDGES), latest, "right")

    def pair_users(self) -> np.ndarray:
        return self.users[self.starts].astype(np.int64)

    def items(self) -> np.ndarray:
        return self.item_rows[self.starts]

    def indptr(self, num_users: int) -> np.ndarray:
        counts = np.bincount(self.pair_users(), minlength=num_users)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def counts(self) -> np.ndarray:
        """(pairs, types x gap buckets) event counts, for fitting the repeat term."""
        code = self.types.astype(np.int64) * GAP_BUCKETS + self.buckets
        pair = np.repeat(np.arange(len(self.starts)), np.diff(np.r_[self.starts, len(self.users)]))
        width = len(EVENT_TYPES) * GAP_BUCKETS
        flat = np.bincount(pair * width + code, minlength=len(self.starts) * width)
        return flat.reshape(len(self.starts), width).astype(np.float32)


@dataclass(frozen=True)
class Bonus:
    """The repeat term per (user row, product row), CSR with products sorted in each row."""

    indptr: np.ndarray  # int64 (users + 1,)
    items: np.ndarray  # int32, sorted within a user
    values: np.ndarray  # float32

    def row(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.indptr[user], self.indptr[user + 1]
        return self.items[lo:hi], self.values[lo:hi]

    def lookup(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """bonus(users[j], items[j]), 0 where the user never touched the product: a binary
        search inside each user's run, all pairs at once."""
        out = np.zeros(len(users), np.float32)
        if not len(self.items) or not len(users):
            return out
        if len(users) <= 32:  # a few pairs: one bisect each beats ten passes over arrays
            starts, ends = self.indptr[users].tolist(), self.indptr[users + 1].tolist()
            for j, (item, lo, end) in enumerate(zip(items.tolist(), starts, ends, strict=True)):
                at = bisect_left(self.items, item, lo, end)
                if at < end and self.items[at] == item:
                    out[j] = self.values[at]
            return out
        lo, end = self.indptr[users], self.indptr[users + 1]
        hi = end.copy()
        for _ in range(int((end - lo).max()).bit_length()):
            active = lo < hi
            mid = (lo + hi) // 2
            less = self.items[np.minimum(mid, len(self.items) - 1)] < items
            lo = np.where(active & less, mid + 1, lo)
            hi = np.where(active & ~less, mid, hi)
        found = lo < end
        found[found] = self.items[lo[found]] == items[found]
        out[found] = self.values[lo[found]]
        return out

    def nbytes(self) -> int:
        return self.indptr.nbytes + self.items.nbytes + self.values.nbytes


@dataclass(frozen=True)
class HistoryModel:
    """What reads a user from their events: the tower, the Dense layer after it, the item
    embeddings it pools, the softmax temperature and the repeat term."""

    tower: HistoryTower
    item_embeddings: np.ndarray  # (items, dim) float32, before the item tower
    dense_weight: np.ndarray  # dense_user: (dim, dim)
    dense_bias: np.ndarray
    temperature: float
    repeat: RepeatTerm

    def user_vectors(self, events: RecentEvents) -> np.ndarray:
        """relu(dense_user(pooled events)) / temperature for every user of `events`."""
        out = self.tower.pooled(events, self.item_embeddings) @ self.dense_weight.T
        out += self.dense_bias
        np.maximum(out, 0.0, out=out)
        out /= np.float32(self.temperature)
        return out.astype(np.float32, copy=False)
