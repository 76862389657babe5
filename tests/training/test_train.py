"""MFBlock training: the fused step against autograd, learning on planted data, the artifact."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from model.artifact import load_model
from model.errors import DataError
from model.mfblock import MFBlock
from training.config import TrainConfig, config_from_dict, make_config
from training.steps import DenseStep, FusedStep
from training.train import train

# the seed's objective and settings (sgd, lr 0.02, momentum 0.9), small and quick
FAST = make_config(
    {"objective": "mse", "epochs": 1, "batch_size": 256, "eval_users": 0, "device": "cpu"}
)
FAST = replace(FAST, threads=1)
# small data needs many small steps; the seed's dropout 0.5 on both towers only adds noise here
LEARN = replace(
    FAST, epochs=4, batch_size=64, num_embeddings=16, dropout=0.0, opt="adagrad", lr=0.05
)


def planted_events(
    groups: int = 8,
    users_per_group: int = 50,
    items_per_group: int = 20,
    events_per_user: int = 40,
    seed: int = 0,
):
    """PreparedEvents with planted groups: a user mostly meets (and buys) its group's items.

    In-group events carry weights 1/3/4 (view/cart/purchase), out-of-group events weight 1,
    so the label depends on the (user, item) pair; item popularity is skewed inside groups.
    Best possible test MSE is about 2/3 of the mean predictor's.
    """
    from training.events import PreparedEvents

    rng = np.random.default_rng(seed)
    num_users, num_items = groups * users_per_group, groups * items_per_group
    user_group = np.arange(num_users) // users_per_group
    item_group = np.arange(num_items) // items_per_group
    weights = 1.0 / np.arange(1, items_per_group + 1)
    weights /= weights.sum()
    users = np.repeat(np.arange(num_users), events_per_user)
    in_group = rng.random(len(users)) < 0.7
    local = rng.choice(items_per_group, size=len(users), p=weights)
    items = np.where(
        in_group,
        user_group[users] * items_per_group + local,
        rng.integers(0, num_items, len(users)),
    )
    labels = np.where(
        item_group[items] == user_group[users],
        rng.choice([1.0, 3.0, 4.0], p=[0.3, 0.4, 0.3], size=len(users)),
        1.0,
    )
    last = np.arange(num_users) * events_per_user + events_per_user - 1  # each user's last event
    train_mask = np.ones(len(users), bool)
    train_mask[last] = False
    i32, f32 = np.int32, np.float32
    return PreparedEvents(
        train_users=users[train_mask].astype(i32),
        train_items=items[train_mask].astype(i32),
        train_labels=labels[train_mask].astype(f32),
        test_users=users[last].astype(i32),
        test_items=items[last].astype(i32),
        test_labels=labels[last].astype(f32),
        user_ids=(np.arange(num_users) * 7 + 1000).astype(np.int64),
        product_ids=(np.arange(num_items) * 13 + 5000).astype(np.int64),
        stats={"planted_groups": groups},
    )


@pytest.fixture(scope="module")
def planted():
    return planted_events()


def _tiny_model(seed: int = 0, dropout: float = 0.0) -> MFBlock:
    model = MFBlock(5, 7, 8, dropout_p=dropout, sparse=False)
    model.init_weights("normal", generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        # Adagrad's first step is g/|g|: with the default N(0, 0.01²) embeddings some
        # gradients are ~1e-9, and summing duplicates in another order can flip their
        # sign. Larger embeddings keep the comparison about the update rule itself.
        model.user_embeddings.weight.mul_(10)
        model.item_embeddings.weight.mul_(10)
    return model


@pytest.mark.parametrize("objective", ["mse", "bpr"])
@pytest.mark.parametrize("opt,wd", [("sgd", 0.0), ("sgd", 0.01), ("adagrad", 0.0)])
def test_fused_step_equals_autograd_and_torch_optimiser(objective, opt, wd):
    # every batch touches every row (with duplicates), so lazy momentum == dense momentum
    cfg = TrainConfig(dropout=0.0, objective=objective, opt=opt, wd=wd, lr=0.05)
    fused_model, dense_model = _tiny_model(), _tiny_model()
    fused = FusedStep(fused_model, cfg, torch.Generator().manual_seed(0))
    dense = DenseStep(dense_model, cfg)
    users = torch.tensor([0, 1, 2, 3, 4, 0, 2, 2])
    items = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])
    labels = torch.tensor([1.0, 3.0, 1.0, 4.0, 1.0, 1.0, 3.0, 3.0])
    negatives = torch.tensor([6, 5, 4, 3, 2, 1, 0, 0]) if objective == "bpr" else None
    for _ in range(3):
        with torch.no_grad():
            loss_fused = fused(users, items, labels, negatives)
        loss_dense = dense(users, items, labels, negatives)
        assert torch.allclose(loss_fused, loss_dense, atol=1e-6)
    for (name, p), q in zip(fused_model.named_parameters(), dense_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


def test_sparse_momentum_with_catch_up_equals_the_seeds_dense_sgd():
    # batches touch few rows; after flush() every row matches dense momentum SGD
    cfg = make_config({"objective": "mse", "dropout": 0.0})
    fused_model, dense_model = _tiny_model(), _tiny_model()
    fused = FusedStep(fused_model, cfg, torch.Generator().manual_seed(0))
    dense = DenseStep(dense_model, cfg)
    batches = [([0, 1], [0, 1]), ([2], [2]), ([2, 2], [3, 3]), ([4], [6]), ([0], [1])]
    for users, items in batches:
        u, i = torch.tensor(users), torch.tensor(items)
        y = torch.full((len(users),), 4.0)
        with torch.no_grad():
            fused(u, i, y)
        dense(u, i, y)
    before_flush = fused_model.user_embeddings.weight.clone()
    fused.flush()
    assert not torch.equal(before_flush, fused_model.user_embeddings.weight)  # rows caught up
    for (name, p), q in zip(fused_model.named_parameters(), dense_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_dropout_mask_keeps_half_and_rescales():
    model = MFBlock(3, 3, 8, dropout_p=0.5)
    step = FusedStep(model, FAST, torch.Generator().manual_seed(1))
    mask = step._mask(torch.ones(512, 64))
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    assert abs((mask > 0).float().mean().item() - 0.5) < 0.01


def test_forward_equals_recommender_from_artifact(planted, tmp_path):
    train(FAST, planted, tmp_path, progress=False)
    rec = load_model(tmp_path)
    manifest = json.loads((tmp_path / "recsql.json").read_text())
    arch = manifest["architecture"]
    model = MFBlock(arch["num_users"], arch["num_items"], arch["num_emb"], arch["dropout_p"])
    weights = load_file(str(tmp_path / "weights.safetensors"))
    model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in weights.items() if k != "item_popularity"}
    )
    model.eval()
    rng = np.random.default_rng(3)
    u = rng.integers(0, arch["num_users"], 500)
    i = rng.integers(0, arch["num_items"], 500)
    with torch.no_grad():
        expected = model(torch.from_numpy(u), torch.from_numpy(i)).numpy()
    got = rec.score(planted.user_ids[u], planted.product_ids[i])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert expected.std() > 0  # not a dead model that would match trivially


def test_mse_training_beats_the_mean_predictor(planted):
    metrics = train(LEARN, planted, None, progress=False)
    first, final = metrics["epochs"][0], metrics["final"]
    assert final["test_mse"] < 0.95 * final["mean_mse"]
    assert final["train_mse"] < first["train_mse"]


def test_bpr_beats_popularity_on_hr_at_10(planted):
    metrics = train(replace(LEARN, objective="bpr"), planted, None, progress=False)
    model_hr, pop_hr = metrics["final"]["hr"], metrics["popularity"]["hr"]
    assert model_hr > pop_hr + 0.1, (model_hr, pop_hr)
    assert metrics["final"]["ndcg"] > metrics["popularity"]["ndcg"]


def test_artifact_metrics_json_and_curves(planted, tmp_path):
    train(replace(FAST, epochs=2), planted, tmp_path, progress=False)
    manifest = json.loads((tmp_path / "recsql.json").read_text())
    assert manifest["kind"] == "mfblock"
    assert manifest["architecture"] == {
        "num_users": 400,
        "num_items": 160,
        "num_emb": 64,
        "dropout_p": 0.5,
    }
    assert manifest["objective"] == "mse" and manifest["init"] == "normal"
    assert manifest["train_config"]["batch_size"] == 256
    assert len(manifest["metrics"]["epochs"]) == 2
    seed_set = planted.without_test_pairs()  # what the mse objective trains on
    assert manifest["global_mean"] == pytest.approx(float(seed_set.train_labels.mean()), rel=1e-6)
    weights = load_file(str(tmp_path / "weights.safetensors"))
    assert weights["item_popularity"].shape == (160,)
    assert np.isfinite(weights["item_popularity"]).all()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("train_mse", "test_mse", "mean_mse", "hr", "ndcg", "samples_per_s"):
        assert np.isfinite(metrics["final"][key]), key
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("update", ["lazy", "dense"])
def test_seed_init_trains_and_is_recorded(planted, tmp_path, update):
    cfg = replace(FAST, init="seed", update=update)
    metrics = train(cfg, planted, tmp_path, progress=False)
    assert np.isfinite(metrics["final"]["test_mse"])
    assert json.loads((tmp_path / "recsql.json").read_text())["init"] == "seed"
    # the seed's Xavier(magnitude=60) bound for a 64x64 table is sqrt(60/64) ~ 0.97
    start = MFBlock(10, 10, 64)
    start.init_weights("seed", generator=torch.Generator().manual_seed(0))
    assert start.user_embeddings.weight.abs().max() > 0.9


def test_device_cuda_without_cuda_is_a_clear_error(planted, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DataError, match="no CUDA device"):
        train(replace(FAST, device="cuda"), planted, None, progress=False)


def test_config_validation_and_hyperparameter_coercion():
    cfg = config_from_dict(
        {"objective": "bpr", "num_embeddings": 32.0, "lr": "0.1", "epochs": 2, "opt": "adagrad"}
    )
    assert (cfg.num_embeddings, cfg.lr, cfg.epochs, cfg.opt) == (32, 0.1, 2, "adagrad")
    with pytest.raises(DataError, match="objective must be one of softmax, mse, bpr"):
        TrainConfig(objective="hinge")
    with pytest.raises(DataError, match="unknown hyperparameter 'epoch'"):
        config_from_dict({"epoch": 3})
    with pytest.raises(DataError, match="epochs must be int"):
        config_from_dict({"epochs": "three"})
    with pytest.raises(DataError, match="dropout"):
        config_from_dict({"dropout": 1.5})
    # SageMaker sends every hyperparameter as a string
    assert config_from_dict({"refit": "false", "patience": "0"}).refit is False
    with pytest.raises(DataError, match="refit must be bool"):
        config_from_dict({"refit": "maybe"})
    with pytest.raises(DataError, match="adam is for --objective softmax"):
        config_from_dict({"objective": "mse", "opt": "adam"})


def test_cli_train_on_synthetic_event_files(tmp_path, capsys):
    import recsql_cli

    events = tmp_path / "events"
    assert recsql_cli.main(["synth", "--rows", "30000", "--out", str(events), "--seed", "1"]) == 0
    model_dir = tmp_path / "model"
    rc = recsql_cli.main(
        [
            "train",
            str(events),
            "--model-dir",
            str(model_dir),
            "--epochs",
            "2",
            "--objective",
            "bpr",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "HR@10" in out and "samples/s" in out
    assert load_model(model_dir).describe()["objective"] == "bpr"


def test_cli_train_device_cuda_error_exits_1(tmp_path, capsys, monkeypatch):
    import recsql_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    planted_events().save(tmp_path / "prepared")
    rc = recsql_cli.main(
        [
            "train",
            str(tmp_path / "prepared"),
            "--device",
            "cuda",
            "--model-dir",
            str(tmp_path / "m"),
            "--no-progress",
        ]
    )
    assert rc == 1
    assert "no CUDA device" in capsys.readouterr().err
    assert not Path(tmp_path / "m").exists()


def test_cli_refuses_abbreviated_options(capsys):
    # argparse's prefix matching would read --train as --train-mse-rows
    import recsql_cli

    with pytest.raises(SystemExit) as exit_info:
        recsql_cli.main(["train", "events.csv", "--train", "x"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recsql_cli.main(["serve", "--model", "x"])  # not --model-dir
    assert "unrecognized arguments: --model" in capsys.readouterr().err


def test_cli_seed_objective_takes_the_seeds_settings():
    import recsql_cli
    from training.config import config_from_args

    args = recsql_cli.build_parser().parse_args(["train", "x.csv", "--objective", "mse"])
    cfg = config_from_args(args)
    assert (cfg.opt, cfg.lr, cfg.dropout, cfg.epochs, cfg.patience) == ("sgd", 0.02, 0.5, 3, 0)
    args = recsql_cli.build_parser().parse_args(["train", "x.csv", "--lr", "0.01", "--no-refit"])
    cfg = config_from_args(args)
    assert (cfg.objective, cfg.opt, cfg.lr, cfg.refit) == ("softmax", "adam", 0.01, False)
