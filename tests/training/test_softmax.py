"""The default objective (softmax, users read from their recent events): it learns planted
groups, early stopping keeps the best epoch, a refit trains the served model on every event,
scores are probabilities, and a history sent by a caller ranks its group first."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from model.artifact import load_model
from model.history import RecentEvents
from training.config import make_config
from training.events import PreparedEvents
from training.train import _stretches, recency_weights, train

from .test_train import planted_events

SOFTMAX = make_config(
    {"epochs": 6, "batch_size": 128, "num_embeddings": 16, "eval_users": 0, "device": "cpu"}
)


@pytest.fixture(scope="module")
def planted():
    return planted_events()


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("softmax")
    metrics = train(SOFTMAX, planted, model_dir, progress=False)
    return metrics, load_model(model_dir), model_dir


def _group_of_items(planted) -> np.ndarray:
    return np.arange(len(planted.product_ids)) // 20  # planted_events: 20 items per group


def test_softmax_learns_the_planted_groups(trained):
    metrics, _, _ = trained
    final, pop = metrics["final"], metrics["popularity"]
    assert final["hr"] > pop["hr"] + 0.15, (final["hr"], pop["hr"])
    assert final["ndcg"] > pop["ndcg"] + 0.05


def test_sampled_softmax_learns_too(planted):
    cfg = replace(SOFTMAX, full_softmax_items=0, negatives=32, refit=False)
    metrics = train(cfg, planted, None, progress=False)
    assert metrics["final"]["hr"] > metrics["popularity"]["hr"] + 0.15


def measure(row: dict) -> float:
    """The early-stopping measure of a history model: NDCG over every product and over new
    products only, averaged."""
    return (row["ndcg"] + row["excluded"]["ndcg"]) / 2


def test_early_stopping_keeps_the_best_epoch(planted):
    cfg = replace(SOFTMAX, epochs=12, patience=2, lr=0.05, refit=False)
    metrics = train(cfg, planted, None, progress=False)
    scores = [measure(row) for row in metrics["epochs"]]
    assert measure(metrics["final"]) == max(scores)
    best = metrics["final"]["epoch"]
    assert len(scores) == min(best + 2, 12)  # stopped `patience` epochs after the best


def test_large_data_is_evaluated_within_an_epoch(planted):
    n = len(planted.train_labels)  # train_on all: an epoch is every training event
    cfg = replace(
        SOFTMAX, epochs=3, eval_every=n // 4 + 1, patience=2, lr=0.05, refit=False, train_on="all"
    )
    metrics = train(cfg, planted, None, progress=False)
    epochs = [row["epoch"] for row in metrics["epochs"]]
    scores = [measure(row) for row in metrics["epochs"]]
    assert epochs[:4] == pytest.approx([0.25, 0.5, 0.75, 1], abs=1e-3)  # 4 parts an epoch
    assert measure(metrics["final"]) == max(scores)
    assert len(scores) == min(scores.index(max(scores)) + 1 + 2, 12)  # patience: evaluations


@pytest.mark.parametrize("n, parts, stop_at", [(1000, 4, 2.5), (999, 3, 1.3), (10, 1, 3)])
def test_a_refit_stops_where_validation_did(n, parts, stop_at):
    runs = list(_stretches(n, parts, stop_at))
    assert sum(end - start for _, start, end in runs) == round(stop_at * n)
    assert all(0 <= start < end <= n for _, start, end in runs)
    assert runs[-1][0] == int(np.ceil(stop_at))


def test_refit_trains_the_served_model_on_every_event(trained, planted, tmp_path):
    validated, kept, model_dir = trained  # the default: no refit
    assert "refit" not in validated
    assert json.loads((model_dir / "metrics.json").read_text())["served_model"] == (
        "validated model"
    )
    metrics = train(replace(SOFTMAX, refit=True), planted, tmp_path, progress=False)
    refit = load_model(tmp_path)
    events = len(planted.train_labels) + len(planted.test_labels)
    assert metrics["refit"]["events"] == events
    assert metrics["refit"]["epochs"] == metrics["final"]["epoch"]
    assert metrics["served_model"] == "refit on every event"
    # a model of its own, trained on every event (not the validated one re-saved)
    assert not np.allclose(refit.item_vectors, kept.item_vectors)


def test_scores_are_probabilities_over_the_catalogue(trained, planted):
    _, rec, model_dir = trained
    assert rec.probabilities
    assert json.loads((model_dir / "recsql.json").read_text())["score"]["kind"] == "probability"
    every_item = np.tile(planted.product_ids, 5)
    users = np.repeat(planted.user_ids[:5], len(planted.product_ids))
    p = rec.score(users, every_item).reshape(5, -1)
    assert (p > 0).all() and (p <= 1).all()
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-4)
    ids, top = rec.top_k(int(planted.user_ids[0]), 3)
    np.testing.assert_allclose(top, rec.score(np.repeat(planted.user_ids[0], 3), ids), rtol=1e-5)


def test_history_ranks_the_planted_group_first(trained, planted):
    _, rec, _ = trained
    group = _group_of_items(planted)
    hits = []
    for g in range(8):
        history = rec.items.rows(planted.product_ids[group == g][:5])
        events = RecentEvents.build(np.zeros(5), history, np.zeros(5), np.arange(5), 1)
        (user,) = rec.read_users(events)
        assert user is not None and user.known_items == 5
        ids, p = rec.rank_vector(
            user.vector, 10, log_normalizer=user.log_normalizer, bonus=user.bonus
        )
        rows = rec.items.rows(ids)
        hits.append(np.mean(group[rows] == g))
        assert (p <= 1).all() and (np.diff(p) <= 0).all()
    user_group = np.arange(len(planted.user_ids)) // 50  # 50 users per group
    known = [
        np.mean(group[rec.items.rows(rec.top_k(int(planted.user_ids[u]), 10)[0])] == user_group[u])
        for u in range(0, len(planted.user_ids), 5)
    ]
    # five products of a group rank that group as well as a known user's own vector does
    # (about half of a top 10 is in-group; chance is 1/8)
    assert np.mean(hits) >= 0.9 * np.mean(known) and np.mean(hits) > 0.3, (hits, known)


def test_history_of_unknown_products_reads_as_nothing(trained):
    _, rec, _ = trained
    events = RecentEvents.build(np.zeros(2), np.array([-1, -1]), np.zeros(2), np.arange(2), 1)
    assert rec.read_users(events) == [None]
    assert rec.fold_in(np.array([-1, 3, 10**12])) is None


def test_recency_weights_halve_per_later_event():
    users = np.array([0, 1, 0, 0, 1])  # rows oldest first
    np.testing.assert_allclose(recency_weights(users, 1.0), [0.25, 0.5, 0.5, 1.0, 1.0])


def test_from_events_holds_out_each_users_last_event():
    users = np.array([7, 7, 9, 7, 9, 5])
    items = np.array([1, 2, 1, 3, 2, 1])
    data = PreparedEvents.from_events(users, items, np.array([1, 1, 3, 4, 1, 1]))
    assert data.user_ids.tolist() == [7, 9, 5]  # most events first
    assert data.product_ids[data.test_items].tolist() == [3, 2]  # users 7, 9: their last
    assert data.user_ids[data.test_users].tolist() == [7, 9]  # user 5: one event, no test
    assert len(data.train_labels) == 4 and data.test_labels.tolist() == [4.0, 1.0]


def test_from_events_without_repeats_drops_the_test_pairs_earlier_events():
    users, items = np.array([7, 7, 7, 7]), np.array([1, 2, 1, 1])
    data = PreparedEvents.from_events(users, items, np.ones(4), repeats=False)
    assert data.product_ids[data.train_items].tolist() == [2]  # the two earlier 1s are gone
    assert data.product_ids[data.test_items].tolist() == [1]


def test_row_adam_moves_rows_as_sparse_adam_does():
    """RowAdam (the softmax step's embedding update) against torch.optim.SparseAdam on the
    same table and gradients, repeated ids included: the same rows move, by the same steps,
    and the rows no batch touched stay where they were."""
    import torch

    from training.softmax import RowAdam

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, 8, generator=gen)
    reference = torch.nn.Embedding(50, 8, sparse=True)
    reference.weight.data.copy_(start)
    sparse = torch.optim.SparseAdam([reference.weight], lr=0.01)
    ours = RowAdam(start.clone(), lr=0.01)
    target = torch.randn(50, 8, generator=gen)
    for _ in range(20):
        ids = torch.randint(0, 30, (16,), generator=gen)  # rows 30..49 never touched
        sparse.zero_grad()
        ((reference(ids) - target[ids]) ** 2).sum().backward()
        sparse.step()
        rows, leaf, which = ours.gather(ids)
        ((leaf[which] - target[ids]) ** 2).sum().backward()
        ours.step(rows, leaf)
    assert torch.allclose(ours.weight, reference.weight.data, atol=1e-6)
    assert torch.equal(ours.weight[30:], start[30:])
    assert not torch.allclose(ours.weight[:30], start[:30])
