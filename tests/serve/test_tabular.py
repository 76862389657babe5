"""A tabular model behind the server: every content type, bad rows, and MME beside MFBlock."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import load_model
from serve import codecs
from serve.config import ServeConfig
from serve.handlers import Invocation
from serve.models import TabularServable
from serve.records import CsvTable
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
def bank_table():
    return read_table(BANK, "y")


@pytest.fixture(scope="module")
def bank_rows(bank_table) -> list[list[str]]:
    """40 raw bank rows (features only, training column order)."""
    return [[str(c[i]) for c in bank_table.columns] for i in range(100, 140)]


@pytest.fixture(scope="module")
def label_rows(bank_table) -> list[list[str]]:
    """100 raw rows that the small model scores on both sides of 0.5."""
    return [[str(c[i]) for c in bank_table.columns] for i in range(80, 180)]


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


# ---------------------------------------------------------------- output=label


def expected_labels(model_dir: Path, rows: list[list[str]]) -> tuple[list[str], np.ndarray]:
    """In-process answer: P(positive) per row and classes[1] where P >= 0.5."""
    model = load_model(model_dir)
    probs = model.predict_rows(rows)
    labels = [model.classes[int(p >= 0.5)] for p in probs]
    assert len(set(labels)) == 2, "the rows must hold both classes for the test to mean much"
    return labels, probs


def split_labelled(lines: list[str]) -> tuple[list[str], np.ndarray]:
    pairs = [line.split(",") for line in lines]
    assert all(len(p) == 2 for p in pairs), lines
    return [p[0] for p in pairs], floats([p[1] for p in pairs])


def test_csv_label_and_probability_when_asked(dataplane, bank_dir, label_rows):
    labels, probs = expected_labels(bank_dir, label_rows)
    rows = [*label_rows, label_rows[0][:3], ["abc", *label_rows[1][1:]]]  # + 2 bad rows
    reply = dataplane.invoke(
        Invocation(csv_body(rows), "text/csv", custom_attributes="output=label")
    )
    lines = reply.body.decode().split("\n")
    assert len(lines) == len(rows) + 1 and lines[-3:] == ["", "", ""]  # bad rows, final \n
    got_labels, got_probs = split_labelled(lines[:-3])
    assert got_labels == labels
    np.testing.assert_allclose(got_probs, probs, rtol=1e-6)
    assert reply.headers["X-Recsql-Null-Rows"] == "2"


def test_json_and_jsonlines_label_records(dataplane, bank_dir, label_rows):
    labels, probs = expected_labels(bank_dir, label_rows)
    body = json.dumps({"instances": [*label_rows, ["short"]], "output": "label"}).encode()
    got = json.loads(dataplane.invoke(Invocation(body, "application/json")).body)["predictions"]
    assert got[-1] is None
    assert [g["label"] for g in got[:-1]] == labels
    np.testing.assert_allclose([g["probability"] for g in got[:-1]], probs, rtol=1e-6)
    lines = [json.dumps(r) for r in label_rows[:5]] + ["{broken"]
    reply = dataplane.invoke(
        Invocation(
            "\n".join(lines).encode(), "application/jsonlines", custom_attributes="output=label"
        )
    )
    out = [json.loads(line) for line in reply.body.decode().splitlines()]
    assert out[-1] is None and [o["label"] for o in out[:-1]] == labels[:5]


def test_output_option_is_checked(dataplane, model_dir, bank_rows):
    from model.errors import BadRequest

    with pytest.raises(BadRequest, match="output 'class' unknown"):
        dataplane.invoke(
            Invocation(csv_body(bank_rows), "text/csv", custom_attributes="output=class")
        )
    recommender = build_dataplane(ServeConfig(model_dir=model_dir))
    with pytest.raises(BadRequest, match="tabular"):
        recommender.invoke(Invocation(b"1,2\n", "text/csv", custom_attributes="output=label"))


def test_similar_products_are_refused_in_one_line(dataplane, bank_rows):
    from model.errors import BadRequest

    doc = json.dumps({"similar_to": [1, 2], "top_k": 3}).encode()
    for invocation in (
        Invocation(doc, "application/json"),
        Invocation(csv_body(bank_rows), "text/csv", custom_attributes="score=similar"),
    ):
        with pytest.raises(BadRequest, match="this is a tabular model") as raised:
            dataplane.invoke(invocation)
        assert raised.value.status == 400 and "\n" not in str(raised.value)


def test_env_default_and_per_request_override_over_http(tmp_path, bank_dir, label_rows):
    labels, probs = expected_labels(bank_dir, label_rows)
    env = {"RECSQL_TABULAR_OUTPUT": "label"}
    with running(["--model-dir", str(bank_dir), "--workers", "1"], tmp_path, env) as server:
        reply = server.post("/invocations", csv_body(label_rows), "text/csv")  # Aurora's request
        assert reply.status_code == 200, reply.text
        got_labels, got_probs = split_labelled(reply.text.splitlines())
        assert got_labels == labels
        np.testing.assert_allclose(got_probs, probs, rtol=1e-6)
        attrs = {"X-Amzn-SageMaker-Custom-Attributes": "output=probability"}
        reply = server.post("/invocations", csv_body(label_rows), "text/csv", **attrs)
        np.testing.assert_allclose(floats(reply.text.splitlines()), probs, rtol=1e-6)
        attrs = {"X-Amzn-SageMaker-Custom-Attributes": "output=maybe"}
        reply = server.post("/invocations", csv_body(label_rows), "text/csv", **attrs)
        assert reply.status_code == 400 and "output 'maybe' unknown" in reply.text


# ---------------------------------------------------------------- CSV fast path


def test_csv_bodies_score_exactly_like_row_by_row(dataplane, bank_dir, label_rows):
    """Plain records are decoded in C (model/native.py), the rest record by record;
    either way the answers equal predict_rows, bit for bit, in place."""
    model = load_model(bank_dir)
    rows = [list(r) for r in label_rows * 3]
    edits = {0: "-0", 5: "-1234", 11: "3.5", 12: "", 13: "NA", 17: "1e3", 19: " 7", 24: "inf"}
    for i, value in edits.items():
        rows[i][5] = value  # balance: a numeric column
    rows[20][1], rows[21][1], rows[22][3] = "astronaut", "admin", "tertiary "  # unseen
    rows[23][0] = "forty"  # not a number: no score
    rows[25][1], rows[26][1] = "a,b", "café"  # quoted, non-ASCII: the per-record path
    rows[27] = rows[27][:-1]  # too few fields: malformed
    want = model.predict_rows([r if len(r) == 16 else [""] * 16 for r in rows])
    want[27] = np.nan
    reply = dataplane.invoke(Invocation(csv_body(rows), "text/csv"))
    got = floats(reply.body.decode().split("\n")[:-1])
    np.testing.assert_array_equal(got, floats([f"{p:.7g}" if p == p else "" for p in want]))
    assert reply.headers["X-Recsql-Malformed-Rows"] == "1"
    assert reply.headers["X-Recsql-Null-Rows"] == "2"  # forty, and the short record
    table = codecs.decode(csv_body(rows), "text/csv").table
    matrix, readable, encoded = TabularServable(model).encode_csv(table)
    np.testing.assert_array_equal(model.predict_encoded(matrix, readable & encoded), want)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_csv_body_encodes_like_the_general_path(bank_dir, label_rows, data):
    """Records mixed from real rows, edited fields and raw bytes: the C decoder plus its
    deferred records give exactly the general path's matrix and masks."""
    model = load_model(bank_dir)
    chosen = data.draw(st.lists(st.sampled_from(label_rows), max_size=30))
    rows = [list(r) for r in chosen]
    tricky = st.sampled_from(["", "NA", "-0", " 1", "1e400", "x", '"', "é", "1,2", "\r", "0.5"])
    for row in rows:
        if data.draw(st.booleans()):
            row[data.draw(st.integers(0, 15))] = data.draw(tricky)
    body = csv_body(rows) + data.draw(st.sampled_from([b"", b"\n", b"1,2\n", b"\r\n"]))
    table = codecs.decode(body, "text/csv").table
    matrix, readable, encoded = TabularServable(model).encode_csv(table)
    columns, want_readable = CsvTable(body).values(model.feature_names)
    want_matrix, want_encoded = model.encoder.encode(columns)
    np.testing.assert_array_equal(readable, want_readable)
    ok = readable & want_readable
    np.testing.assert_array_equal(encoded[ok], want_encoded[ok])
    np.testing.assert_array_equal(matrix[ok], want_matrix[ok])
