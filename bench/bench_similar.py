"""Similar products (issue L): how well does `similar_to` (the cosine of the model's item
vectors) predict the next product from the last one alone?

Protocol: bench_quality's split at cut-off 1 (each user's last event held out) and
`recsql train` defaults (make_config({})) on the rest. For each test user the query is the
product of their last training event and the target their held-out product; a user whose
target is the query, or a product never seen in training, is left out (the counts are
printed). Every method ranks every product seen in training except the query, as
`similar_to` does; on MovieLens (no repeats) the user's own training products are excluded
too, for the users whose target is new to them (bench_quality's "excluded" mode), on
Complete Journey (groceries: repeats are most of it) nothing else is. Ties count against.
HR@10 / NDCG@10 are means over those users; "±" is one bootstrap standard error over users
(1,000 draws, the same draws for every method), and "vs item-cosine" the paired difference.

  similar_to (cosine)   Recommender.top_similar([query]): the cosine of item-tower outputs
  history [query]       the model reading a one-event history (serve's "history" option:
                        the history tower and its softmax)
  item-cosine last 1    training/baselines.py: cosine on the binary user x product matrix
  popularity            training events per product
  (model, all events)   reference, not from the last product alone: the model's own
                        ranking for the user (user vector + repeat term)

    python bench/bench_similar.py [--data movielens,completejourney] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import (  # noqa: E402
    Split,
    bootstrap,
    completejourney,
    movielens,
    train_default,
    user_scorer,
)

from model.history import RecentEvents  # noqa: E402
from model.recommender import Recommender  # noqa: E402
from training.baselines import rule_scorers  # noqa: E402
from training.config import make_config  # noqa: E402
from training.metrics import SeenItems, rank_metrics  # noqa: E402

K = 10
Scorer = Callable[[np.ndarray], np.ndarray]  # test positions -> (n, catalogue columns)


class Queries:
    """The test users of a split: their last training event (the query) and target, as
    columns of the ranked catalogue, and what each user's ranking excludes."""

    def __init__(self, split: Split, exclude_seen: bool) -> None:
        d, train_events = split.data, split.train
        users = d.test_users.astype(np.int64)
        has_events = np.diff(train_events.indptr)[users] > 0
        last = train_events.indptr[users + 1] - 1
        query = np.where(has_events, train_events.items[np.maximum(last, 0)], -1)
        target = d.test_items.astype(np.int64)
        keep = has_events & split.known & (target != query)
        self.left_out = {"target is the query": int((has_events & (target == query)).sum())}
        self.left_out["target unseen in training"] = int((~split.known).sum())
        seen = SeenItems(train_events.indptr, train_events.items.astype(np.int64))
        pos, items = seen.pairs(users)
        if exclude_seen:  # only users whose target is new to them
            repeat = np.zeros(len(users), bool)
            repeat[pos[items == target[pos]]] = True
            self.left_out["target is a repeat"] = int((keep & repeat).sum())
            keep &= ~repeat
        self.column = np.full(len(d.product_ids), -1)
        self.column[split.columns] = np.arange(len(split.columns))
        self.columns = split.columns
        self.users, self.query, self.target = users[keep], query[keep], target[keep]
        self.last = last[keep]
        self.train = train_events
        # excluded per test position: the query, and (exclude_seen) the user's own products
        chosen = np.flatnonzero(keep)
        if exclude_seen:
            at = np.isin(pos, chosen)
            owner = np.searchsorted(chosen, pos[at])
            extra = np.r_[owner, np.arange(len(chosen))]
            products = np.r_[items[at], self.query]
        else:
            extra, products = np.arange(len(chosen)), self.query
        self.excluded = SeenItems.build(extra, self.column[products], len(chosen))

    def __len__(self) -> int:
        return len(self.users)

    def evaluate(self, scores: Scorer) -> dict:
        return rank_metrics(
            scores, np.arange(len(self)), self.column[self.target], self.excluded, K, chunk=256,
            ties="against", per_user=True,
        )  # fmt: skip


def model_scorers(rec: Recommender, split: Split, q: Queries) -> dict[str, Scorer]:
    d = split.data
    rows = rec.items.rows(d.product_ids[q.columns])  # catalogue column -> model row
    known = (rows >= 0)[:, None]
    unit = np.where(known, rec.unit_item_vectors[np.maximum(rows, 0)], 0.0)
    items = np.where(known, rec.item_vectors[np.maximum(rows, 0)], 0.0)
    query_unit = unit[q.column[q.query]]

    def similar(pos: np.ndarray) -> np.ndarray:
        return query_unit[pos] @ unit.T

    one = RecentEvents.build(
        np.arange(len(q)), rec.items.rows(d.product_ids[q.query]), q.train.types[q.last],
        q.train.times[q.last], len(q),
    )  # fmt: skip
    readers = rec.read_users(one)
    history_vectors = np.stack(
        [r.vector if r is not None else np.zeros(items.shape[1], np.float32) for r in readers]
    )

    def history(pos: np.ndarray) -> np.ndarray:  # the query's repeat bonus: excluded anyway
        return history_vectors[pos] @ items.T

    whole_user = user_scorer(rec, d.user_ids[q.users], d.product_ids[q.columns])

    return {"similar": similar, "history": history, "user": whole_user}


def rule_columns(split: Split, q: Queries) -> dict[str, Scorer]:
    d = split.data
    rules = rule_scorers(split.train, len(d.product_ids), q.users, last=1)
    cosine, popularity = rules["item_cosine_last1"], rules["popularity"]
    return {
        "cosine": lambda pos: cosine(pos)[:, q.columns],
        "popularity": lambda pos: popularity(pos)[:, q.columns],
    }


NAMES = {
    "similar": "similar_to (cosine)",
    "history": "history [query]",
    "cosine": "item-cosine last 1",
    "popularity": "popularity",
    "user": "(model, all events)",
}


def run(label: str, events, exclude_seen: bool, seed: int) -> None:
    start = time.perf_counter()
    split = Split.at(events, 1)
    q = Queries(split, exclude_seen)
    rec = train_default(split, make_config({"seed": seed}))
    trained = time.perf_counter() - start
    scorers = {**model_scorers(rec, split, q), **rule_columns(split, q)}
    per_method = {NAMES[m]: [q.evaluate(scorers[m])] for m in NAMES}
    stats = {m: bootstrap(per_method, m) for m in ("hits", "gains")}
    left = ", ".join(f"{n} {v:,}" for n, v in q.left_out.items())
    d = split.data
    print(
        f"\n### {label}: {len(d.train_users):,} training events, {len(q.columns):,} products,"
        f" {len(q):,} test users (left out: {left}); seed {seed}, trained in {trained:.0f} s,"
        f" all in {time.perf_counter() - start:.0f} s\n"
    )
    print("| method | HR@10 | NDCG@10 | HR@10 vs item-cosine | NDCG@10 vs item-cosine |")
    print("|---|---|---|---|---|")
    base = NAMES["cosine"]
    for method in per_method:
        cells = []
        for metric in ("hits", "gains"):
            mean, draws = stats[metric][method]
            cells.append(f"{mean:.4f} ± {draws.std():.4f}")
        for metric in ("hits", "gains"):
            (mean, draws), (b_mean, b_draws) = stats[metric][method], stats[metric][base]
            cells.append(
                "—" if method == base else f"{mean - b_mean:+.4f} ± {(draws - b_draws).std():.4f}"
            )
        print(f"| {method} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="movielens", help="movielens,completejourney")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    args = p.parse_args()
    print("## Similar products: next product from the last one alone (HR@10 / NDCG@10)")
    for name in args.data.split(","):
        if name == "movielens":
            run("MovieLens latest-small", movielens(), True, args.seed)
        elif name == "completejourney":
            run("Complete Journey", completejourney(), False, args.seed)
        else:
            raise SystemExit(f"unknown data set {name!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
