"""The simple rules a shop holds a recommender against, scored on the same held-out events:

    popularity          training events per product
    item_cosine_last5   cosine between products on the binary user x product matrix, summed
                        over the user's last 5 events' products with weight 0.8^k (k = 0 for
                        the latest)
    top_frequency       how many of the user's own events name the product (buy it again),
                        popularity breaking ties

Each is a scorer for training/evaluate.py `rank_metrics`, so a rule and the model are ranked
by one evaluator, in both modes (`modes`): "kept" ranks every product, "excluded" ranks the
products new to the user, for the users whose held-out product is new to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from model.history import RecentEvents
from training.metrics import SeenItems, rank_metrics

RULES = ("popularity", "item_cosine_last5", "top_frequency")
LAST, DECAY = 5, 0.8
Scorer = Callable[[np.ndarray], np.ndarray]


def rule_scorers(
    events: RecentEvents, num_items: int, users: np.ndarray, last: int = LAST
) -> dict[str, Scorer]:
    """Scorers for `users` (rows of `events`, every training event of theirs, oldest first):
    scorer(rows) -> (len(rows), num_items) scores of users[rows]. Item-cosine reads each
    user's `last` events (its key says how many: item_cosine_last5 by default)."""
    from scipy.sparse import csr_matrix

    owner = events.user_rows()
    counts = np.bincount(events.items, minlength=num_items).astype(np.float64)
    shape = (events.num_users, num_items)
    freq = csr_matrix((np.ones(len(events)), (owner, events.items)), shape=shape)
    freq.sum_duplicates()
    binary = freq.copy()
    binary.data[:] = 1.0
    norms = np.sqrt(np.asarray(binary.sum(0)).ravel())
    unit = binary.multiply(1.0 / np.maximum(norms, 1.0)[None, :]).tocsr()  # columns: unit norm
    unit_t = unit.T.tocsr()
    from_end = events.from_end()
    recent_rows = from_end < last
    recent = csr_matrix(
        (DECAY ** from_end[recent_rows], (owner[recent_rows], events.items[recent_rows])),
        shape=shape,
    ).tocsr()
    tie = counts / (counts.max() + 1.0)

    def popularity(rows: np.ndarray) -> np.ndarray:
        return np.tile(counts, (len(rows), 1))

    def item_cosine(rows: np.ndarray) -> np.ndarray:
        return ((recent[users[rows]] @ unit_t) @ unit).toarray()

    def top_frequency(rows: np.ndarray) -> np.ndarray:
        return freq[users[rows]].toarray() + tie

    return {
        "popularity": popularity,
        f"item_cosine_last{last}": item_cosine,
        "top_frequency": top_frequency,
    }


def modes(
    events: RecentEvents, num_items: int, users: np.ndarray, test_items: np.ndarray
) -> dict[str, tuple[np.ndarray, SeenItems]]:
    """{"kept": (positions, no exclusion), "excluded": (positions of users whose held-out
    product is new to them, their training products excluded)}: positions into `users`."""
    seen = SeenItems(events.indptr, events.items.astype(np.int64))
    pos, items = seen.pairs(users)
    repeat = np.zeros(len(users), bool)
    repeat[pos[items == test_items[pos]]] = True
    nothing = SeenItems(np.zeros(events.num_users + 1, np.int64), np.empty(0, np.int64))
    return {"kept": (np.arange(len(users)), nothing), "excluded": (np.flatnonzero(~repeat), seen)}


def rule_metrics(
    events: RecentEvents,
    num_items: int,
    users: np.ndarray,
    test_items: np.ndarray,
    k: int = 10,
    ties: str = "random",
) -> dict[str, dict[str, Any]]:
    """{mode: {rule: {"hr", "ndcg", "users"}}} for every rule in both modes."""
    scorers = rule_scorers(events, num_items, users)
    out: dict[str, dict[str, Any]] = {}
    for mode, (positions, seen) in modes(events, num_items, users, test_items).items():
        out[mode] = {}
        for name, scorer in scorers.items():

            def subset(
                rows: np.ndarray, scorer: Scorer = scorer, positions: np.ndarray = positions
            ) -> np.ndarray:
                return scorer(positions[rows])

            out[mode][name] = rank_metrics(
                subset, users[positions], test_items[positions], seen, k, chunk=256, ties=ties
            )
    return out
