"""The SageMaker training contract, on a fake /opt/ml tree in a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.artifact import load_model
from model.errors import DataError
from training.sagemaker import SageMakerEnv, parse_hyperparameters, training_config

from .test_train import planted_events

ROOT = Path(__file__).resolve().parents[2]


def _fake_opt_ml(root: Path, hyperparameters: dict[str, str]) -> Path:
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    planted_events().save(root / "input" / "data" / "train")
    (root / "model").mkdir()
    (root / "output").mkdir()
    return root


FAST_HPS = {
    "epochs": "1",
    "batch_size": "256",
    "num_embeddings": "8",
    "eval_users": "50",
    "device": "cpu",
    "objective": "bpr",
    "sagemaker_program": '"ignored.py"',
}


def test_hyperparameter_strings_are_json_decoded_or_kept_raw():
    parsed = parse_hyperparameters(
        {
            "lr": "0.02",
            "epochs": "3",
            "opt": "sgd",
            "objective": '"bpr"',
            "odd": "[1, 2",
            "flag": "true",
        }
    )
    assert parsed == {
        "lr": 0.02,
        "epochs": 3,
        "opt": "sgd",
        "objective": "bpr",
        "odd": "[1, 2",
        "flag": True,
    }


def test_training_config_from_seed_hyperparameters():
    cfg = training_config(
        {
            "objective": "mse",
            "num_embeddings": "32",
            "opt": "sgd",
            "lr": "0.05",
            "momentum": "0.8",
            "wd": "0.0001",
            "epochs": "2",
            "batch_size": "2048",
            "sagemaker_region": '"eu-west-1"',
        }
    )
    assert (cfg.num_embeddings, cfg.opt, cfg.lr, cfg.momentum) == (32, "sgd", 0.05, 0.8)
    assert (cfg.wd, cfg.epochs, cfg.batch_size) == (0.0001, 2, 2048)
    with pytest.raises(DataError, match="unknown hyperparameter 'learning_rate'"):
        training_config({"learning_rate": "0.1"})
    with pytest.raises(DataError, match="add --objective mse"):
        training_config({"opt": "sgd"})


def test_detect_needs_opt_ml_or_sm_variables(tmp_path):
    assert SageMakerEnv.detect({"RECSQL_SM_ROOT": str(tmp_path / "absent")}) is None
    env = SageMakerEnv.detect(
        {
            "RECSQL_SM_ROOT": str(tmp_path / "absent"),
            "SM_MODEL_DIR": str(tmp_path / "m"),
            "SM_CHANNELS": '["events"]',
            "SM_CHANNEL_EVENTS": str(tmp_path / "ev"),
            "SM_HPS": '{"lr": "0.1"}',
        }
    )
    assert env.model_dir == tmp_path / "m"
    assert env.channels() == {"events": tmp_path / "ev"}
    assert env.hyperparameters() == {"lr": "0.1"}


@pytest.mark.parametrize("objective", ["bpr", "softmax", "mse"])
def test_training_job_success_writes_the_artifact(tmp_path, monkeypatch, objective):
    """Each objective, the default (softmax over a history tower: no test MSE) included."""
    import recsql_cli

    root = _fake_opt_ml(tmp_path / "opt_ml", {**FAST_HPS, "objective": objective})
    monkeypatch.setenv("RECSQL_SM_ROOT", str(root))
    assert recsql_cli.main(["train"]) == 0
    model = load_model(root / "model")
    assert model.describe()["objective"] == objective
    manifest = json.loads((root / "model" / "recsql.json").read_text())
    assert manifest["train_config"]["num_embeddings"] == 8
    assert (root / "model" / "metrics.json").is_file()
    assert (root / "model" / "curves.png").is_file()
    assert (root / "output" / "data" / "metrics.json").is_file()
    assert not (root / "output" / "failure").exists()


@pytest.mark.parametrize(
    "hps,reason",
    [
        ({"epochs": "0"}, "epochs must be > 0"),
        ({"objective": "hinge"}, "objective must be one of softmax, mse, bpr"),
        ({"num_embedings": "8"}, "unknown hyperparameter 'num_embedings'"),
    ],
)
def test_training_job_failure_writes_the_reason(tmp_path, monkeypatch, hps, reason):
    import recsql_cli

    root = _fake_opt_ml(tmp_path / "opt_ml", hps)
    monkeypatch.setenv("RECSQL_SM_ROOT", str(root))
    assert recsql_cli.main(["train"]) == 1
    assert reason in (root / "output" / "failure").read_text()
    assert not (root / "model" / "recsql.json").exists()


def test_training_job_with_unreadable_events_fails_cleanly(tmp_path, monkeypatch):
    import recsql_cli

    root = tmp_path / "opt_ml"
    (root / "input" / "data" / "train").mkdir(parents=True)
    (root / "input" / "data" / "train" / "events.csv").write_text("not,an,event,file\n1,2,3,4\n")
    monkeypatch.setenv("RECSQL_SM_ROOT", str(root))
    assert recsql_cli.main(["train"]) == 1
    failure = (root / "output" / "failure").read_text()
    assert "events.csv" in failure and "Traceback" not in failure


def test_training_job_process_exits_non_zero_on_bad_hyperparameters(tmp_path):
    root = tmp_path / "opt_ml"
    (root / "input" / "data" / "train").mkdir(parents=True)
    (root / "input" / "data" / "train" / "events.csv").write_text("not,an,event,file\n1,2,3,4\n")
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text("{not json")
    env = {**os.environ, "RECSQL_SM_ROOT": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "recsql_cli", "train"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    failure = (root / "output" / "failure").read_text()
    assert "hyperparameters.json: not JSON" in failure
    assert len(failure) <= 1025
