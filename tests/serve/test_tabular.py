"""A tabular model behind the server: every content type, bad rows, and MME beside MFBlock."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model import load_model
from serve.config import ServeConfig
from serve.handlers import Invocation
from serve.server import build_dataplane
from tests.serve.conftest import make_artifact, running
from training.tabular import TabularConfig, read_table, train_tabular

BANK = Path(__file__).resolve().parents[1] / "data" / "bank-full.csv.gz"


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bank") / "model"
    config = TabularConfig(
        target="y", max_rows=1500, hyperparameters={"num_round": 30}, threads=1, progress=False
    )
    train_tabular(BANK, out, config)
    return out


@pytest.fixture(scope="module")
def bank_rows() -> list[list[str]]:
    """40 raw bank rows (features only, training column order)."""
    table = read_table(BANK, "y")
    return [[str(c[i]) for c in table.columns] for i in range(100, 140)]


@pytest.fixture(scope="module")
def expected(bank_dir: Path, bank_rows: list[list[str]]) -> np.ndarray:
    return load_model(bank_dir).predict_rows(bank_rows)


@pytest.fixture(scope="module")
def dataplane(bank_dir: Path):
    return build_dataplane(ServeConfig(model_dir=bank_dir))


def csv_body(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def floats(lines: list[str]) -> np.ndarray:
    return np.array([float(x) if x not in ("", "null") else np.nan for x in lines])


def test_csv_rows_in_training_order(dataplane, bank_rows, expected):
    reply = dataplane.invoke(Invocation(csv_body(bank_rows), "text/csv; charset=utf-8"))
    assert reply.content_type == "text/csv"
    lines = reply.body.decode().splitlines()
    assert len(lines) == len(bank_rows)
    np.testing.assert_allclose(floats(lines), expected, rtol=1e-6)  # 7 significant digits


def test_bad_rows_get_an_empty_line_in_place(dataplane, bank_rows, expected):
    rows = [bank_rows[0], bank_rows[1][:5], ["abc"] + bank_rows[2][1:], bank_rows[3]]
    reply = dataplane.invoke(Invocation(csv_body(rows), "text/csv"))
    lines = reply.body.decode().split("\n")
    assert lines[1] == "" and lines[2] == "" and lines[4] == ""  # 4 lines + final newline
    np.testing.assert_allclose(floats([lines[0], lines[3]]), expected[[0, 3]], rtol=1e-6)
    assert reply.headers["X-Recsql-Null-Rows"] == "2"
    assert reply.headers["X-Recsql-Malformed-Rows"] == "1"


def test_json_records_by_name_and_instances(dataplane, bank_dir, bank_rows, expected):
    names = load_model(bank_dir).feature_names
    by_name = {n: [r[j] for r in bank_rows] for j, n in enumerate(names)}
    by_name["age"] = [int(v) for v in by_name["age"]]  # JSON numbers work too
    reply = dataplane.invoke(Invocation(json.dumps(by_name).encode(), "application/json"))
    got = json.loads(reply.body)["predictions"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    records = [dict(zip(names, r, strict=True)) for r in bank_rows]
    body = json.dumps({"instances": records}).encode()
    reply = dataplane.invoke(Invocation(body, "application/json", accept="text/csv"))
    np.testing.assert_allclose(floats(reply.body.decode().splitlines()), expected, rtol=1e-6)


def test_jsonlines_one_output_per_line(dataplane, bank_dir, bank_rows, expected):
    names = load_model(bank_dir).feature_names
    lines = [json.dumps(dict(zip(names, r, strict=True))) for r in bank_rows[:3]]
    lines.insert(1, "{broken")
    lines.append(json.dumps(bank_rows[3]))  # a positional list is a record too
    reply = dataplane.invoke(Invocation("\n".join(lines).encode(), "application/jsonlines"))
    out = reply.body.decode().splitlines()
    assert len(out) == 5 and out[1] == "null"
    np.testing.assert_allclose(floats(out[:1] + out[2:]), expected[:4], rtol=1e-6)


def test_describe_names_the_inputs(dataplane, bank_dir):
    doc = dataplane.describe_model("model")
    assert doc["kind"] == "tabular" and doc["inputs"] == load_model(bank_dir).feature_names


@pytest.mark.slow
def test_multi_model_beside_the_recommender(tmp_path, bank_dir, bank_rows, expected):
    root = tmp_path / "models"
    shutil.copytree(bank_dir, root / "bank" / "model")
    rec_dir = make_artifact(root / "rec" / "model")
    recommender = load_model(rec_dir)
    args = ["--multi-model", "--model-root", str(root), "--workers", "2"]
    with running(args, tmp_path) as server:
        for name in ("bank", "rec"):
            doc = {"model_name": name, "url": str(root / name / "model")}
            assert server.post("/models", json.dumps(doc), "application/json").status_code == 200
        listed = {m["modelName"] for m in server.get("/models").json()["models"]}
        assert listed == {"bank", "rec"}
        for _ in range(3):  # both workers, both models
            reply = server.post(
                "/invocations",
                csv_body(bank_rows),
                "text/csv",
                **{"X-Amzn-SageMaker-Target-Model": "bank"},
            )
            assert reply.status_code == 200, reply.text
            np.testing.assert_allclose(floats(reply.text.splitlines()), expected, rtol=1e-6)
            users = recommender.users.sorted_ids[:3]
            items = recommender.items.sorted_ids[:3]
            pairs = "".join(f"{u},{i}\n" for u, i in zip(users, items, strict=True))
            reply = server.post(
                "/invocations", pairs, "text/csv", **{"X-Amzn-SageMaker-Target-Model": "rec"}
            )
            assert reply.status_code == 200, reply.text
            np.testing.assert_allclose(
                floats(reply.text.splitlines()), recommender.score(users, items), rtol=1e-6
            )
