"""HR@K / NDCG@K with exclusions and ties, the popularity baseline, `recsql evaluate`."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from training.config import make_config
from training.evaluate import evaluate_model_dir
from training.metrics import SeenItems, popularity_metrics, ranking_metrics, sample_rows
from training.train import train

from .test_train import LEARN, planted_events


def test_seen_items_pairs():
    seen = SeenItems.build(np.array([2, 0, 2, 2]), np.array([5, 1, 6, 5]), num_users=3)
    pos, items = seen.pairs(np.array([2, 1, 0]))
    assert pos.tolist() == [0, 0, 0, 2]
    assert items.tolist() == [5, 6, 5, 1]


def test_ranking_excludes_seen_items_but_keeps_the_held_out_one():
    item_vectors = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]])  # scores fall with the index
    user_vectors = np.array([[1.0], [1.0]])
    # user 0 saw items 0 and 1 (excluded) and 3 (its test item: kept); test item 3 -> rank 1
    # user 1 saw nothing; test item 4 -> rank 4
    seen = SeenItems.build(np.array([0, 0, 0]), np.array([0, 1, 3]), num_users=2)
    got = ranking_metrics(user_vectors, item_vectors, np.array([0, 1]), np.array([3, 4]), seen, k=2)
    assert got["hr"] == pytest.approx(0.5)  # only user 0 within the top 2
    assert got["ndcg"] == pytest.approx((1 / math.log2(3)) / 2)
    got = ranking_metrics(user_vectors, item_vectors, np.array([0, 1]), np.array([3, 4]), seen, k=5)
    assert got["hr"] == 1.0
    assert got["ndcg"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / 2)


def test_ties_count_as_a_random_order_not_a_win():
    # a dead tower scores every item 0: the expected HR@K is K / candidates, not 1
    seen = SeenItems.build(np.array([], np.int64), np.array([], np.int64), num_users=1)
    got = ranking_metrics(
        np.zeros((1, 4)), np.ones((100, 4)), np.array([0]), np.array([7]), seen, k=10
    )
    assert got["hr"] == pytest.approx(0.10)
    expected_ndcg = sum(1 / math.log2(r + 2) for r in range(10)) / 100
    assert got["ndcg"] == pytest.approx(expected_ndcg)


def test_popularity_baseline_ranks_by_training_count():
    train_users = np.array([0, 0, 1, 1, 1, 2])
    train_items = np.array([3, 3, 3, 2, 2, 1])  # counts: item3 3, item2 2, item1 1
    seen = SeenItems.build(train_users, train_items, num_users=4)
    # user 3 saw nothing: test item 2 is the second most popular
    got = popularity_metrics(train_items, 5, np.array([3]), np.array([2]), seen, k=1)
    assert got["hr"] == 0.0
    got = popularity_metrics(train_items, 5, np.array([3]), np.array([2]), seen, k=2)
    assert got["hr"] == 1.0 and got["ndcg"] == pytest.approx(1 / math.log2(3))


def test_sample_rows_is_seeded_and_bounded():
    a, b = sample_rows(1000, 50, seed=3), sample_rows(1000, 50, seed=3)
    assert np.array_equal(a, b) and len(np.unique(a)) == 50
    assert len(sample_rows(10, 0, 0)) == 10 and len(sample_rows(10, 50, 0)) == 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = planted_events()
    model_dir = tmp_path_factory.mktemp("model")
    # --no-refit: the saved model is the one the training-time metrics were taken on
    cfg = replace(LEARN, objective="bpr", refit=False)
    metrics = train(cfg, data, model_dir, progress=False)
    return data, model_dir, metrics


def test_saved_model_evaluation_matches_training_time_metrics(trained):
    data, model_dir, metrics = trained
    result = evaluate_model_dir(model_dir, data, k=10, eval_users=0)
    assert result["model"]["hr"] == pytest.approx(metrics["final"]["hr"], abs=1e-6)
    assert result["model"]["ndcg"] == pytest.approx(metrics["final"]["ndcg"], abs=1e-6)
    assert result["popularity"]["hr"] == pytest.approx(metrics["popularity"]["hr"], abs=1e-6)
    assert result["test_mse"] is None  # bpr scores are no estimate of event weights
    assert result["test_rows"] == len(data.test_users)


def test_cli_evaluate_prints_a_table_and_writes_json(trained, tmp_path, capsys):
    import recsql_cli

    data, model_dir, metrics = trained
    data.save(tmp_path / "prepared")
    out_json = tmp_path / "eval.json"
    rc = recsql_cli.main(
        [
            "evaluate",
            "--model-dir",
            str(model_dir),
            str(tmp_path / "prepared"),
            "--k",
            "10",
            "--eval-users",
            "0",
            "--json",
            str(out_json),
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "HR@10" in table and "popularity" in table and "mean predictor" in table
    result = json.loads(out_json.read_text())
    assert result["model"]["hr"] == pytest.approx(metrics["final"]["hr"], abs=1e-6)


def test_cli_evaluate_rejects_a_missing_model_dir(tmp_path, capsys):
    import recsql_cli

    planted_events().save(tmp_path / "prepared")
    rc = recsql_cli.main(
        ["evaluate", "--model-dir", str(tmp_path / "nope"), str(tmp_path / "prepared")]
    )
    assert rc == 1
    assert "model directory not found" in capsys.readouterr().err


def test_a_history_model_is_evaluated_as_training_evaluated_it(tmp_path, capsys):
    """`recsql evaluate` reads each user from their prepared training events, with the
    repeat term, in both modes, beside the simple rules: the numbers training reported."""
    import recsql_cli

    data = planted_events()
    cfg = make_config({"epochs": 3, "batch_size": 128, "num_embeddings": 16, "eval_users": 0})
    metrics = train(cfg, data, tmp_path / "model", progress=False)
    result = evaluate_model_dir(tmp_path / "model", data, k=10, eval_users=0)
    final = metrics["final"]
    assert result["model"]["hr"] == pytest.approx(final["hr"], abs=2e-3)
    assert result["model"]["ndcg"] == pytest.approx(final["ndcg"], abs=2e-3)
    assert result["excluded"]["hr"] == pytest.approx(final["excluded"]["hr"], abs=2e-3)
    assert result["baselines"] == metrics["baselines"]
    assert result["verdict"] == metrics["verdict"]
    data.save(tmp_path / "prepared")
    argv = ["evaluate", "--model-dir", str(tmp_path / "model"), str(tmp_path / "prepared")]
    assert recsql_cli.main([*argv, "--eval-users", "0"]) == 0
    table = capsys.readouterr().out
    assert "new products only" in table and "item cosine last5" in table
