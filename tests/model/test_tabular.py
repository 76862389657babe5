"""Tabular models: the encoding, each family's artifact round trip, and what the loader refuses."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from model import load_model
from model.errors import ArtifactError, BadRequest
from model.tabular import Column, Encoder, TabularModel
from training.tabular import fit

NAMES = ["age", "job", "balance"]
JOBS = ["admin.", "technician", "student", "retired"]


def planted(n: int = 600, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Raw string columns; y depends on age, job and balance."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 90, n)
    job = rng.choice(JOBS, n)
    balance = rng.normal(1000, 800, n).round(1)
    logit = 0.05 * (age - 50) + 1.5 * (job == "student") - 1.0 * (job == "admin.") + balance / 800
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    columns = [
        age.astype(str).astype(object),
        job.astype(object),
        balance.astype(str).astype(object),
    ]
    columns[2][::37] = ""  # missing balances
    return columns, y


@pytest.fixture(scope="module")
def data():
    return planted()


def make_model(family: str, data, params: dict | None = None) -> TabularModel:
    columns, y = data
    encoder = Encoder.fit(NAMES, columns)
    x, ok = encoder.encode(columns)
    assert ok.all()
    defaults = {"xgboost": {"max_depth": 3, "num_round": 20}, "lightgbm": {"num_round": 20}}
    predictor = fit(family, params or defaults.get(family, {}), x, y, seed=0, threads=1)
    return TabularModel(encoder, predictor, ["no", "yes"], label="y")


def test_encoder_infers_types_and_one_hot_layout(data):
    columns, _ = data
    enc = Encoder.fit(NAMES, columns)
    assert [c.categories is None for c in enc.columns] == [True, False, True]
    assert sorted(enc.columns[1].categories) == sorted(JOBS)
    assert enc.width == 2 + len(JOBS)
    assert enc.encoded_names[0] == "age" and enc.encoded_names[-1] == "balance"
    x, ok = enc.encode(
        [np.array(["30", "", "40"], object)]
        + [
            np.array(["student", "student", "astronaut"], object),
            np.array(["1.5", "NA", "?"], object),
        ]
    )
    assert ok.all()
    student = enc.columns[1].index["student"]
    assert x[0, 0] == 30 and np.isnan(x[1, 0])
    assert x[0, student] == 1 and x[0, 1:-1].sum() == 1
    assert x[2, 1:-1].sum() == 0  # unseen category: all zeros
    assert x[0, -1] == np.float32(1.5) and np.isnan(x[1, -1]) and np.isnan(x[2, -1])


def test_encoder_marks_non_numbers_bad_and_accepts_json_values(data):
    enc = Encoder.fit(NAMES, data[0])
    x, ok = enc.encode(
        [
            np.array([31, "abc", 40.0], object),
            np.array(["retired", 7, None], object),
            np.array([1.0, 2.0, True], object),
        ]
    )
    assert ok.tolist() == [True, False, True]
    assert x[0, enc.columns[1].index["retired"]] == 1
    numeric_jobs = Encoder([Column("job", ["7", "8"])])
    x2, _ = numeric_jobs.encode([np.array([7, 8.0, "8", 9], object)])
    assert x2.tolist() == [[1, 0], [0, 1], [0, 1], [0, 0]]


def test_encoder_caps_vocabulary_and_round_trips_json():
    values = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"], object)
    enc = Encoder.fit(["x"], [values], max_categories=2, min_count=2)
    assert enc.columns[0].categories == ["a", "b"]
    again = Encoder.from_json(json.loads(json.dumps(enc.to_json())))
    assert again.encoded_names == enc.encoded_names
    with pytest.raises(BadRequest, match="needs 1"):
        enc.encode([values, values])


@pytest.mark.parametrize(
    "family,model_file",
    [("xgboost", "model.ubj"), ("lightgbm", "model.txt"), ("logistic", "logistic.json")],
)
def test_round_trip_each_family(tmp_path: Path, data, family: str, model_file: str):
    model = make_model(family, data)
    columns, y = data
    expected = model.predict_columns(columns)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, expected) > 0.75  # it learned the planted signal
    model.save(tmp_path, metrics={"auc": 0.9})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([model_file, "recsql.json"])
    loaded = load_model(tmp_path)
    assert isinstance(loaded, TabularModel) and loaded.kind == "tabular"
    assert loaded.family == family and loaded.classes == ["no", "yes"]
    assert loaded.feature_names == NAMES
    got = loaded.predict_columns(columns)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # same answer whatever array types the server hands over
    as_unicode = [np.asarray(c, dtype=str) for c in columns]
    np.testing.assert_allclose(loaded.predict_columns(as_unicode), expected, atol=1e-6)
    described = loaded.describe()
    assert described["kind"] == "tabular" and described["inputs"] == NAMES
    assert described["categorical"] == {"job": 4} and described["metrics"] == {"auc": 0.9}


def test_bad_rows_are_nan_and_aligned(data):
    model = make_model("xgboost", data)
    rows = [["40", "student", "100"], ["forty", "student", "100"], ["40", "student", "100"]]
    probs = model.predict_rows(rows)
    assert np.isnan(probs[1]) and not np.isnan(probs[0]) and probs[0] == probs[2]
    assert model.predict_columns([np.array([], object)] * 3).shape == (0,)
    with pytest.raises(BadRequest):
        model.predict_rows([["40", "student"]])


def test_logistic_imputes_missing_with_training_mean(data):
    model = make_model("logistic", data)
    center = model.predictor.center[-1]
    a = model.predict_rows([["40", "student", ""]])
    b = model.predict_rows([["40", "student", str(float(center))]])
    np.testing.assert_allclose(a, b, atol=1e-9)


@pytest.fixture
def saved(tmp_path: Path, data) -> Path:
    make_model("xgboost", data).save(tmp_path)
    return tmp_path


def _edit_manifest(model_dir: Path, **changes) -> None:
    path = model_dir / "recsql.json"
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_loader_refuses_pickle_files(saved: Path):
    (saved / "model.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ArtifactError, match="pickle/joblib"):
        load_model(saved)


def test_loader_refuses_unknown_model_file_names(saved: Path):
    (saved / "model.ubj").rename(saved / "model.bin")
    _edit_manifest(saved, model_file="model.bin")
    with pytest.raises(ArtifactError, match="refusing model_file 'model.bin'"):
        load_model(saved)
    _edit_manifest(saved, model_file="../model.ubj")
    with pytest.raises(ArtifactError, match="refusing model_file"):
        load_model(saved)


def test_loader_refuses_pickle_content_under_a_safe_name(saved: Path):
    (saved / "model.ubj").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ArtifactError, match="looks like a pickle"):
        load_model(saved)


def test_loader_refuses_unknown_family(saved: Path):
    _edit_manifest(saved, family="autogluon")
    with pytest.raises(ArtifactError, match="unknown tabular family 'autogluon'"):
        load_model(saved)


def test_loader_refuses_feature_mismatch(saved: Path):
    doc = json.loads((saved / "recsql.json").read_text())
    doc["encoding"]["columns"][1]["categories"].append("astronaut")
    (saved / "recsql.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="feature mismatch"):
        load_model(saved)
    _edit_manifest(saved, feature_names=["age", "balance", "job"])
    with pytest.raises(ArtifactError, match="feature_names do not match"):
        load_model(saved)


def test_loader_refuses_corrupt_booster_and_bad_classes(saved: Path):
    _edit_manifest(saved, classes=["yes"])
    with pytest.raises(ArtifactError, match="two distinct classes"):
        load_model(saved)
    _edit_manifest(saved, classes=["no", "yes"])
    (saved / "model.ubj").write_bytes(b"{not a booster")
    with pytest.raises(ArtifactError, match="cannot load the xgboost model"):
        load_model(saved)
