"""The model contract: every servable model kind behind one small interface.

    ServableModel.predict(payload, options) -> Scores | Rankings
    ServableModel.describe() -> dict
    ServableModel.memory_bytes() -> int

`ADAPTERS` maps the `kind` of whatever `model.load_model()` returns to the
adapter that makes it servable. This dict is the one seam for a new model
kind: write `class XModel(ServableModel)` here (or in its own module that
registers itself) and add `ADAPTERS["x"] = XModel`; tests/serve/contract.py
then runs the shared contract tests against it.

User scripts (`code/inference.py`) are the other route in: serve/scripts.py, which also
holds `load_servable` (a model directory -> the script's model or this adapter).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.errors import ArtifactError, BadRequest
from model.recommender import FoldIn, Recommender
from serve.events import as_recent_events
from serve.history import parse_histories
from serve.records import CsvTable, Payload, Prediction, Rankings, Scores

MAX_TOP_K = 1000
SCORES = ("pair", "similar")  # what a pair request scores: (user, product) or (product, product)
SIMILAR_INPUTS = ("product_a", "product_b")
LABEL_THRESHOLD = 0.5  # P(positive) >= this -> classes[1], as training's accuracy counts it


@dataclass(frozen=True)
class Options:
    """Per-request choices: from env defaults, custom attributes and the body."""

    fallback: str = "null"
    top_k: int | None = None
    candidates: Any = None  # list of product ids, or one list per user
    exclude: Any = None
    history: Any = None  # top-K for users the model does not know: product ids, or a list each
    output: str | None = None  # "probability" or "label" (tabular models); None: probability
    similar_to: Any = None  # top-K of the products most like these: product ids, or a list each
    score: str = "pair"  # "similar": pairs are (product, product), scored by cosine
    # user ids -> their fresh events (serve/events.py FreshEvents.lookup); None: none kept
    fresh_events: Callable[[np.ndarray], dict[int, np.ndarray]] | None = None


class ServableModel(ABC):
    kind: str = "unknown"

    @abstractmethod
    def predict(self, payload: Payload, options: Options) -> Prediction:
        """One output per input record, in order; NaN where there is no score."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able facts about the model (kind, inputs, sizes)."""

    def memory_bytes(self) -> int:
        return 0


def _counts(ok: np.ndarray, scores: np.ndarray, fallback: np.ndarray | None) -> dict[str, int]:
    malformed = int(len(ok) - np.count_nonzero(ok))
    null = int(np.isnan(scores).sum())
    fallen = int(fallback.sum()) if fallback is not None else 0
    return {
        "malformed": malformed,
        "unknown": null - malformed + fallen,
        "fallback": fallen,
        "null": null,
    }


def _id_lists(value: Any, what: str) -> list[np.ndarray]:
    """`candidates`/`exclude`/`history`: one list of product ids, or one list per user."""
    if not isinstance(value, list):
        raise BadRequest(f'"{what}" must be a list of product ids (or one list per user)')
    lists = value if value and all(isinstance(v, list) for v in value) else [value]
    for ids in lists:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
            raise BadRequest(f'"{what}" must hold integer product ids')
        if any(not -(2**63) <= v < 2**63 for v in ids):
            raise BadRequest(f'"{what}" product ids must fit in 64 bits')
    return [np.array(ids, dtype=np.int64) for ids in lists]


def _per_user(value: Any, n_users: int, what: str, who: str = "users") -> list[np.ndarray | None]:
    """`candidates`/`exclude` for each of n_users: one list for all, or one list each."""
    if value is None:
        return [None] * n_users
    lists: list[np.ndarray | None] = list(_id_lists(value, what))
    if len(lists) == 1 and not (value and isinstance(value[0], list)):
        return lists * n_users
    if len(lists) != n_users:
        raise BadRequest(f'"{what}" has {len(lists)} lists for {n_users} {who}')
    return lists


class RecommenderModel(ServableModel):
    """MFBlock (recsql-trained or seed MXNet): scores `user_id,product_id` pairs."""

    kind = "mfblock"
    inputs = ("user_id", "product_id")

    def __init__(self, recommender: Recommender) -> None:
        self.recommender = recommender

    def predict(self, payload: Payload, options: Options) -> Prediction:
        if options.output == "label":
            raise BadRequest("output=label is for tabular models; this model scores pairs")
        if options.similar_to is not None:
            return self.rank_similar(options)
        if options.score == "similar":
            return self.score_similar(payload, options)
        if options.history is not None:
            return self.rank_histories(options)
        if options.top_k is not None:
            return self.rank(payload, options)
        (users, products), ok = payload.table.ints(self.inputs)
        scores = self.recommender.score(users, products)
        reads = self.read_fresh(users[ok], options)
        if reads:
            self.rescore(reads, users, products, ok, scores)
        if not ok.all():
            scores[~ok] = np.nan  # malformed rows were parsed as id 0 placeholders
        fallback = None
        if options.fallback != "null":
            fallback = np.isnan(scores) & ok
            if fallback.any():
                scores[fallback] = self.recommender.fallback_scores(
                    products[fallback], options.fallback
                )
            fallback &= ~np.isnan(scores)
        return Scores(scores, _counts(ok, scores, fallback))

    def rank(self, payload: Payload, options: Options) -> Rankings:
        k = options.top_k
        (users,), ok = payload.table.ints(self.inputs[:1])
        candidates = _per_user(options.candidates, len(users), "candidates")
        exclude = _per_user(options.exclude, len(users), "exclude")
        ids, scores, user_ids = [], [], []
        empty = np.empty(0, np.int64), np.empty(0, np.float32)
        reads = self.read_fresh(users[ok], options, normalize=False)  # rank_vector's job
        for row, user in enumerate(users.tolist()):
            read = reads.get(user) if ok[row] else None
            if read is not None:
                best = self.recommender.rank_vector(
                    read.vector,
                    k,
                    candidates[row],
                    exclude[row],
                    read.log_normalizer,
                    read.bonus,
                    normalize=read.log_normalizer is None,
                )
            elif ok[row]:
                best = self.recommender.top_k(user, k, candidates[row], exclude[row])
            else:
                best = empty
            ids.append(best[0])
            scores.append(best[1])
            user_ids.append(user if ok[row] else None)
        unknown = sum(1 for row in range(len(users)) if ok[row] and len(ids[row]) == 0)
        counts = {"malformed": int((~ok).sum()), "unknown": unknown, "fallback": 0}
        counts["null"] = counts["malformed"] + unknown
        return Rankings(ids, scores, user_ids, counts)

    def read_fresh(
        self, user_ids: np.ndarray, options: Options, normalize: bool = True
    ) -> dict[int, FoldIn]:
        """The users among `user_ids` whose reading their fresh events change, read with
        them (Recommender.read_fresh); {} at once when the store holds none of them."""
        if options.fresh_events is None or not len(user_ids):
            return {}
        fresh = options.fresh_events(user_ids)
        if not fresh:
            return {}
        rec = self.recommender
        return rec.read_fresh(*as_recent_events(fresh, rec.items.rows), normalize)

    def rescore(
        self,
        reads: dict[int, FoldIn],
        users: np.ndarray,
        products: np.ndarray,
        ok: np.ndarray,
        scores: np.ndarray,
    ) -> None:
        """Pair scores of the rows whose user was read from fresh events, in place."""
        if len(reads) <= 4:  # a request's one or few users: no sort, one pass per user
            for user, read in reads.items():
                rows = np.flatnonzero(ok & (users == user))
                item_rows = self.recommender.items.rows(products[rows])
                scores[rows] = self.recommender.score_read(read, item_rows)
            return
        rows = np.flatnonzero(ok & np.isin(users, np.fromiter(reads, np.int64, len(reads))))
        order = rows[np.argsort(users[rows], kind="stable")]
        starts = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1]])
        item_rows = self.recommender.items.rows(products)
        for group in np.split(order, starts[1:]):
            read = reads[int(users[group[0]])]
            scores[group] = self.recommender.score_read(read, item_rows[group])

    def rank_histories(self, options: Options) -> Rankings:
        """Top-K from each history's events (serve/history.py; Recommender.read_users); a
        history the model knows nothing of gets the popularity ranking, and each reply
        says which."""
        rec = self.recommender
        events = parse_histories(options.history, rec.items.rows, rec.recent_events)
        if options.top_k is None:
            raise BadRequest('"history" needs "top_k": it ranks products, it scores no pairs')
        k, n = options.top_k, events.num_users
        candidates = _per_user(options.candidates, n, "candidates")
        exclude = _per_user(options.exclude, n, "exclude")
        ids, scores, basis = [], [], []
        for row, user in enumerate(rec.read_users(events, normalize=False)):
            if user is None:
                best = rec.rank_vector(None, k, candidates[row], exclude[row])
            else:
                best = rec.rank_vector(
                    user.vector,
                    k,
                    candidates[row],
                    exclude[row],
                    user.log_normalizer,
                    user.bonus,
                    normalize=user.log_normalizer is None,
                )
            ids.append(best[0])
            scores.append(best[1])
            basis.append("popularity" if user is None else "history")
        fallen = basis.count("popularity")
        counts = {"malformed": 0, "unknown": fallen, "fallback": fallen, "null": 0}
        return Rankings(ids, scores, [None] * n, counts, basis)

    def score_similar(self, payload: Payload, options: Options) -> Scores:
        """score=similar: each `product_a,product_b` record's cosine (Recommender.similarity);
        NaN where either product is unknown, whatever the fallback policy."""
        if options.top_k is not None:
            raise BadRequest(
                "score=similar scores product pairs; for the top-K similar products send"
                ' {"similar_to": [...], "top_k": K}'
            )
        (product_a, product_b), ok = payload.table.ints(SIMILAR_INPUTS)
        scores = self.recommender.similarity(product_a, product_b)
        scores[~ok] = np.nan
        return Scores(scores, _counts(ok, scores, None))

    def rank_similar(self, options: Options) -> Rankings:
        """Top-K of the products most similar to each `similar_to` list (mean cosine,
        Recommender.top_similar); a list the model knows none of gets the popularity
        ranking, and each reply says which."""
        value = options.similar_to
        if options.history is not None:
            raise BadRequest('send either "history" or "similar_to", not both')
        if not isinstance(value, list) or not value:
            raise BadRequest(
                '"similar_to" must be a non-empty list of product ids (or one list per query)'
            )
        queries = _id_lists(value, "similar_to")
        if any(len(ids) == 0 for ids in queries):
            raise BadRequest('"similar_to" lists must each name at least one product id')
        if options.top_k is None:
            raise BadRequest('"similar_to" needs "top_k": it ranks products, it scores no pairs')
        rec, k, n = self.recommender, options.top_k, len(queries)
        candidates = _per_user(options.candidates, n, "candidates", "similar_to lists")
        exclude = _per_user(options.exclude, n, "exclude", "similar_to lists")
        ids, scores, basis = [], [], []
        for row, products in enumerate(queries):
            best = rec.top_similar(products, k, candidates[row], exclude[row])
            basis.append("similar" if best is not None else "popularity")
            if best is None:  # none of them known: nothing to exclude but `exclude`
                best = rec.rank_vector(None, k, candidates[row], exclude[row])
            ids.append(best[0])
            scores.append(best[1])
        fallen = basis.count("popularity")
        counts = {"malformed": 0, "unknown": fallen, "fallback": fallen, "null": 0}
        return Rankings(ids, scores, [None] * n, counts, basis)

    def describe(self) -> dict[str, Any]:
        return self.recommender.describe()

    def memory_bytes(self) -> int:
        rec = self.recommender
        arrays: Sequence[Any] = (
            rec.user_vectors,
            rec.item_vectors,
            rec.users.sorted_ids,
            rec.items.sorted_ids,
            rec.item_popularity,
        )
        history = rec.history.item_embeddings.nbytes if rec.history is not None else 0
        bonus = rec.bonus.nbytes() if rec.bonus is not None else 0
        events = rec.events
        kept = 0 if events is None else sum(a.nbytes for a in vars(events).values())
        # ids: sorted + by row
        return int(sum(a.nbytes for a in arrays if a is not None) * 2) + history + bonus + kept


class TabularServable(ServableModel):
    """A tabular classifier (model/tabular.py): one P(positive) per record.

    Records carry the features in training order (CSV), or by name (JSON);
    a record that cannot be read, or that holds a non-number in a numeric
    column, gets NaN (an empty CSV line, JSON null).
    """

    kind = "tabular"

    def __init__(self, model: Any) -> None:
        self.model = model

    def predict(self, payload: Payload, options: Options) -> Prediction:
        if options.similar_to is not None or options.score == "similar":
            raise BadRequest(
                "similar_to and score=similar rank products by a recommender's item vectors;"
                " this is a tabular model"
            )
        table = payload.table
        if isinstance(table, CsvTable):
            matrix, readable, encoded = self.encode_csv(table)
        else:
            columns, readable = table.values(self.model.feature_names)
            matrix, encoded = self.model.encoder.encode(columns)
        # Unreadable records were filled with "" placeholders: never scored.
        scores = self.model.predict_encoded(matrix, readable & encoded)
        result = Scores(scores, _counts(readable, scores, None))
        if options.output == "label":
            result.labels = self.labels(scores)
        return result

    def encode_csv(self, table: CsvTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feature matrix, readable and encoded masks of a CSV body: plain records are
        decoded in C, the deferred rest (quoted, non-ASCII, malformed) by CsvTable.values."""
        encoder = self.model.encoder
        matrix, deferred = encoder.encode_csv(table.body, table.n_rows)
        readable, encoded = np.ones(table.n_rows, bool), np.ones(table.n_rows, bool)
        rows = np.flatnonzero(deferred)
        if len(rows):
            columns, readable[rows] = table.subset(rows).values(self.model.feature_names)
            matrix[rows], encoded[rows] = encoder.encode(columns)
        return matrix, readable, encoded

    def labels(self, scores: np.ndarray) -> list[str | None]:
        """classes[1] where P >= LABEL_THRESHOLD, classes[0] below, None without a score."""
        negative, positive = self.model.classes
        with np.errstate(invalid="ignore"):
            chosen = np.where(scores >= LABEL_THRESHOLD, 1, 0)
        chosen[np.isnan(scores)] = 2
        return [(negative, positive, None)[c] for c in chosen.tolist()]

    def describe(self) -> dict[str, Any]:
        return self.model.describe()


# kind (as the loaded model reports it) -> adapter. The seam for new model kinds.
ADAPTERS: dict[str, Callable[[Any], ServableModel]] = {
    "mfblock": RecommenderModel,
    "tabular": TabularServable,
}


def wrap(model: Any) -> ServableModel:
    """The servable adapter for a model object from `model.load_model()`."""
    if isinstance(model, ServableModel):
        return model
    kind = getattr(model, "kind", None)
    adapter = ADAPTERS.get(kind) if isinstance(kind, str) else None
    if adapter is None:
        raise ArtifactError(
            f"no server adapter for model kind {kind!r}; servable kinds: {', '.join(ADAPTERS)}"
        )
    return adapter(model)
