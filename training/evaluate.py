"""`recsql evaluate`: a saved model on prepared events, scored as training scored it.

Models with a per-user embedding are ranked as training ranked them (training/metrics.py:
their training products excluded except the held-out one). A history model reads each
user from their prepared training events (its own stored events are as of its training, the
held-out ones included) and is ranked in both modes beside the simple rules
(training/baselines.py), as `recsql train` reports it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import ArtifactError, DataError
from training.metrics import SeenItems, mse, popularity_metrics, ranking_metrics, sample_rows

log = logging.getLogger(__name__)


def evaluate_model_dir(
    model_dir: Path, data: Any, k: int = 10, eval_users: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """Evaluate a saved MFBlock on prepared events, matched by external ids."""
    from model.artifact import load_model
    from model.recommender import Recommender

    model = load_model(model_dir)
    if not isinstance(model, Recommender):
        raise ArtifactError(f"{model_dir}: evaluate supports MFBlock models, not {model.kind!r}")
    if model.history is not None:
        return _evaluate_history(model, model_dir, data, k, eval_users, seed)
    data = data.without_test_pairs()  # the set such a model trained and was ranked on
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


def _evaluate_history(
    model: Any, model_dir: Path, data: Any, k: int, eval_users: int, seed: int
) -> dict[str, Any]:
    """A history model on the users of `data`, read from their training events."""
    from model.history import RecentEvents
    from training.baselines import modes, rule_metrics
    from training.history import training_events
    from training.results import verdict

    to_model = model.items.rows(data.product_ids)  # data's product rows -> the model's
    test_items = to_model[data.test_items]
    known = test_items >= 0
    if not known.any():
        raise DataError("no held-out event names a product the model knows")
    pick = np.flatnonzero(known)[sample_rows(int(known.sum()), eval_users, seed)]
    every = training_events(data).subset(data.test_users[pick].astype(np.int64))
    events = RecentEvents(every.indptr, to_model[every.items].astype(np.int32), every.types,
                          every.times).known()  # fmt: skip
    items = test_items[pick]
    vectors = model.history.user_vectors(events)
    result: dict[str, Any] = {"model_dir": str(model_dir), "objective": "softmax", "k": k}
    for mode, (positions, seen) in modes(events, len(model.item_vectors), np.arange(len(pick)),
                                         items).items():  # fmt: skip
        bonus = model.history.repeat.bonus(events) if mode == "kept" else None
        got = ranking_metrics(
            vectors[positions], model.item_vectors, positions, items[positions], seen, k,
            bonus=bonus,
        )  # fmt: skip
        result["model" if mode == "kept" else mode] = got
    baselines = rule_metrics(events, len(model.item_vectors), np.arange(len(pick)), items, k)
    final = {**result["model"], "excluded": result["excluded"]}
    result.update(
        test_rows=int(known.sum()),
        test_rows_unknown=int((~known).sum()),
        baselines=baselines,
        verdict=verdict(final, baselines, k),
    )
    return result


def format_table(result: dict[str, Any]) -> str:
    if "baselines" in result:
        from training.results import baseline_table

        final = {**result["model"], "excluded": result["excluded"]}
        return "\n".join(
            [
                baseline_table(final, result["baselines"], result["k"]),
                result["verdict"],
                f"({result['model']['users']} users ranked over all products;"
                f" {result['test_rows']} test rows)",
            ]
        )
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
