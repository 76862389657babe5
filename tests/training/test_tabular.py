"""`recsql train-tabular` on slices of the real bank-marketing and Titanic files."""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model import load_model
from model.errors import DataError
from training import cli
from training.tabular import XGBOOST_PRESET, TabularConfig, read_table, train_tabular

DATA = Path(__file__).resolve().parents[1] / "data"
BANK = DATA / "bank-full.csv.gz"
TITANIC = DATA / "titanic.csv"
QUICK = TabularConfig(target="y", max_rows=3000, threads=1, progress=False)
OUTPUTS = {
    "leaderboard.csv",
    "fit_summary.txt",
    "model_performance.txt",
    "test_prediction.csv",
    "eval.png",
    "recsql.json",
}


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def leaderboard(model_dir: Path) -> list[dict[str, str]]:
    with open(model_dir / "leaderboard.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_bank_file_is_the_full_uci_file():
    table = read_table(BANK, "y")
    assert len(table.labels) == 45211 and len(table.names) == 16
    assert table.names[:3] == ["age", "job", "marital"]
    assert set(table.labels.tolist()) == {"no", "yes"}


def test_xgboost_preset_on_a_bank_slice(tmp_path: Path):
    summary = train_tabular(BANK, tmp_path, QUICK)
    assert OUTPUTS | {"model.ubj"} <= {p.name for p in tmp_path.iterdir()}
    manifest = json.loads((tmp_path / "recsql.json").read_text())
    assert manifest["kind"] == "tabular" and manifest["family"] == "xgboost"
    assert manifest["hyperparameters"] == XGBOOST_PRESET
    assert manifest["classes"] == ["no", "yes"] and manifest["label"] == "y"
    assert summary["test_auc"] > 0.85  # bank-full with duration: ~0.93 on the full file
    model = load_model(tmp_path)
    assert model.feature_names == read_table(BANK, "y").names
    # test_prediction.csv holds the loaded model's answers for the held-out rows
    rows = list(csv.DictReader(open(tmp_path / "test_prediction.csv", newline="")))
    assert len(rows) == 900
    table = read_table(BANK, "y")
    picked = np.array([int(r["row"]) - 1 for r in rows])
    probs = model.predict_columns([c[picked] for c in table.columns])
    np.testing.assert_allclose(probs, [float(r["probability_yes"]) for r in rows], atol=1e-6)
    assert [r["label"] for r in rows] == table.labels[picked].tolist()
    perf = (tmp_path / "model_performance.txt").read_text()
    for needle in ("accuracy:", "AUC:", "AUPRC:", "precision", "Overall Classification Rate"):
        assert needle in perf
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_automl_picks_the_best_cv_candidate(tmp_path: Path):
    config = replace(QUICK, preset="automl", folds=2, max_rows=2000)
    summary = train_tabular(BANK, tmp_path, config)
    board = leaderboard(tmp_path)
    assert {r["family"] for r in board} == {"xgboost", "lightgbm", "logistic"}
    assert len(board) == 4
    scores = [float(r["score_val"]) for r in board]
    assert scores == sorted(scores, reverse=True)  # ranked by CV score
    assert summary["best_model"] == board[0]["model"]
    assert json.loads((tmp_path / "recsql.json").read_text())["model_name"] == board[0]["model"]
    assert "folds=[" in (tmp_path / "fit_summary.txt").read_text()


def test_automl_families_and_metric(tmp_path: Path):
    config = replace(
        QUICK, preset="automl", folds=2, max_rows=1500, families=("logistic",), metric="logloss"
    )
    summary = train_tabular(BANK, tmp_path, config)
    assert summary["best_family"] == "logistic"
    assert (tmp_path / "logistic.json").is_file() and not (tmp_path / "model.ubj").exists()
    assert float(leaderboard(tmp_path)[0]["score_val"]) < 0  # logloss is negated: higher=better


def test_headerless_label_first(tmp_path: Path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(int)
    path = tmp_path / "train.csv"
    path.write_text(
        "".join(f"{t},{a:.4f},{b:.4f},{c:.4f}\n" for t, (a, b, c) in zip(y, x, strict=True))
    )
    out = tmp_path / "model"
    summary = train_tabular(path, out, TabularConfig(progress=False, threads=1))
    model = load_model(out)
    assert model.feature_names == ["f1", "f2", "f3"] and model.classes == ["0", "1"]
    assert summary["test_auc"] > 0.8
    probs = model.predict_rows([["2.0", "0", "0"], ["-2.0", "0", "0"]])
    assert probs[0] > 0.5 > probs[1]


def test_titanic_missing_values_and_drop(tmp_path: Path):
    config = TabularConfig(
        target="survived",
        drop=("name", "ticket", "boat", "body", "home.dest"),
        progress=False,
        threads=1,
    )
    summary = train_tabular(TITANIC, tmp_path, config)
    model = load_model(tmp_path)
    assert "age" in model.describe()["numeric"]  # '?' is a missing token, not a category
    assert "sex" in model.describe()["categorical"]
    assert model.classes == ["0", "1"]
    assert summary["test_auc"] > 0.75


def test_hyperparameter_overrides_and_determinism(tmp_path: Path):
    config = replace(QUICK, max_rows=1000, hyperparameters={"num_round": 7, "max_depth": 2})
    first = train_tabular(BANK, tmp_path / "a", config)
    second = train_tabular(BANK, tmp_path / "b", config)
    assert first["test_auc"] == second["test_auc"]
    manifest = json.loads((tmp_path / "a" / "recsql.json").read_text())
    assert manifest["hyperparameters"]["num_round"] == 7
    assert manifest["hyperparameters"]["eta"] == XGBOOST_PRESET["eta"]


def test_cli_train_tabular(tmp_path: Path, capsys):
    code = run_cli(
        "train-tabular",
        str(BANK),
        "--target",
        "y",
        "--model-dir",
        str(tmp_path),
        "--max-rows",
        "1200",
        "--hp",
        "num_round=20",
        "--no-progress",
        "--threads",
        "1",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "XGBoost_preset: test AUC" in out and "model,family,score_val" in out
    assert OUTPUTS <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    "content,target,message",
    [
        ("a,b\n" + "1,x\n" * 20, "y", "no column 'y'"),
        ("a,y\n" + "".join(f"{i},{i % 3}\n" for i in range(30)), "y", "exactly 2 classes"),
        ("a,y\n" + "1,0\n" * 20 + "1,2,3\n", "y", "record 22 has 3 fields"),
        ("a,y\n1,0\n", "y", "need at least 10"),
    ],
)
def test_bad_input_is_a_data_error(tmp_path: Path, content: str, target: str, message: str):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        train_tabular(path, tmp_path / "m", replace(QUICK, target=target))


def test_bad_options_are_data_errors(tmp_path: Path):
    with pytest.raises(DataError, match="--positive 'maybe'"):
        train_tabular(BANK, tmp_path, replace(QUICK, positive="maybe"))
    with pytest.raises(DataError, match="--drop: no column nope"):
        train_tabular(BANK, tmp_path, replace(QUICK, drop=("nope",)))
    with pytest.raises(DataError, match="--families"):
        run_cli(
            "train-tabular",
            str(BANK),
            "--target",
            "y",
            "--model-dir",
            str(tmp_path),
            "--families",
            "xgboost,catboost",
        )


def test_gzip_and_semicolon_are_sniffed(tmp_path: Path):
    path = tmp_path / "small.csv.gz"
    with gzip.open(BANK, "rt") as src, gzip.open(path, "wt") as dst:
        for _, line in zip(range(400), src, strict=False):
            dst.write(line)
    table = read_table(path, "y")
    assert len(table.labels) == 399 and table.columns[1][0] == "management"
