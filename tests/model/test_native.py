"""model/native.py: the compiled CSV decoder and tree walker against the general paths.

The decoder must give, for every record it does not defer, exactly the row
`Encoder.encode` gives for that record's fields; the Forest must give XGBoost's
own predictions. Both are checked on values chosen to hit their edges; the
variant routing fractions must be hashlib's MD5.
"""

from __future__ import annotations

import csv
import hashlib
import io

import numpy as np
import pytest
import xgboost as xgb
from hypothesis import given, settings
from hypothesis import strategies as st

from model import native
from model.native import Forest
from model.tabular import MISSING_TOKENS, Column, Encoder, XGBoostPredictor
from serve.records import CsvTable, split_records

JOBS = ["admin.", "blue-collar", "student", "", "unknown", "x"]
ENCODER = Encoder(
    [Column("age"), Column("job", JOBS), Column("balance"), Column("month", ["may", "jun"])]
)
PLAIN_NUMBERS = [
    "0",
    "7",
    "-0",
    "+5",
    "-1234",
    "3.5",
    "5.",
    ".5",
    "1e3",
    "-2.5E-3",
    "123456789012345678",
    "0.1000000000000000055511151231257827",
]
GENERAL_NUMBERS = [" 7", "7 ", "inf", "-inf", "nan", "1_000", "0x10", "1e", "--1", ".", "abc", "١٢"]
CATEGORY_VALUES = JOBS + [
    "admin",
    "ADMIN.",
    "student ",
    "astronaut",
    "NA",
    "café",
    "a,b",
    'say "hi"',
]


def reference(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The general path: CsvTable's per-record fields -> Encoder.encode."""
    columns, readable = CsvTable(body).values(ENCODER.feature_names)
    matrix, encoded = ENCODER.encode(columns)
    return matrix, readable & encoded


def body_of(rows: list[list[str]], crlf: bool = False) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n" if crlf else "\n").writerows(rows)
    return out.getvalue().encode()


def check(body: bytes) -> np.ndarray:
    """Decode in C; every row it keeps must equal the reference bit for bit."""
    n = body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)
    matrix, deferred = ENCODER.encode_csv(body, n)
    want, ok = reference(body)
    assert matrix.shape == want.shape
    kept = ~deferred
    assert ok[kept].all(), "C kept a record the general path cannot score"
    np.testing.assert_array_equal(matrix[kept], want[kept])
    assert not matrix[deferred].any()
    return deferred


def test_plain_records_are_decoded_in_c_exactly():
    rows = [
        [age, job, balance, month]
        for age, job, balance, month in zip(
            PLAIN_NUMBERS + list(MISSING_TOKENS),
            (JOBS + ["astronaut", "ADMIN."]) * 4,
            list(MISSING_TOKENS) + PLAIN_NUMBERS,
            ["may", "jun", "dec", ""] * 6,
            strict=False,
        )
    ]
    deferred = check(body_of(rows))
    assert not deferred.any()  # all plain: none left for the slow path
    assert not check(body_of(rows, crlf=True)).any()
    matrix, _ = ENCODER.encode_csv(b"58,student,-0,may\n", 1)
    assert matrix[0].tolist() == [58, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    assert np.signbit(matrix[0, 7])  # -0 stays -0, as float("-0")


@pytest.mark.parametrize(
    "body",
    [
        b" 7,student,1,may\n",  # a number with a space
        b"inf,student,1,may\n",
        b"1_000,student,1,may\n",
        b"abc,student,1,may\n",  # not a number: the general path says why
        b"7,student,1\n",  # too few fields
        b"7,student,1,may,\n",  # too many
        b'7,"a,b",1,may\n',  # quoted
        "7,café,1,may\n".encode(),  # non-ASCII
        b"7,student,1,may\r",  # a carriage return not before a newline
        b"7,stu\x00dent,1,may\n",
    ],
)
def test_records_c_cannot_read_exactly_are_deferred(body: bytes):
    assert check(body).all()


def test_record_count_follows_the_line_rules():
    for body, n in [(b"", 0), (b"\n", 1), (b"\n\n", 2), (b"1,x,2,may", 1), (b"1,x,2,may\r\n", 1)]:
        matrix, deferred = ENCODER.encode_csv(body, n)
        assert matrix.shape == (n, ENCODER.width)
    with pytest.raises(ValueError, match="holds 2 records, not 3"):
        ENCODER.encode_csv(b"1,x,2,may\n1,x,2,may\n", 3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([b"\n", b"\r\n", b"\r", b"1,2", b"x" * 3000]), max_size=40))
def test_record_counts_of_long_bodies_follow_split_records(parts):
    body = b"".join(parts)
    assert native.count_records(body) == len(split_records(body))


field = st.one_of(
    st.sampled_from(PLAIN_NUMBERS + GENERAL_NUMBERS + CATEGORY_VALUES + list(MISSING_TOKENS)),
    st.text(alphabet=st.sampled_from('0123456789.-+eE ",\r\nab\x00é'), max_size=6),
)
record = st.lists(field, min_size=3, max_size=5)


@settings(max_examples=300, deadline=None)
@given(st.lists(record, max_size=12), st.booleans())
def test_any_body_decodes_like_the_general_path(rows, crlf):
    check(body_of(rows, crlf))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_like_the_general_path(body):
    check(body)


# ---------------------------------------------------------------- Forest


def booster(depth: int, objective: str = "binary:logistic", rounds: int = 30, **extra):
    rng = np.random.default_rng(depth)
    x = rng.normal(size=(800, 6)).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = np.nan  # missing values: learned default directions
    x[:, 5] = rng.integers(0, 2, 800)  # a one-hot-like column
    y = ((np.nan_to_num(x[:, 0]) + x[:, 5] - np.nan_to_num(x[:, 1]) ** 2) > 0).astype(int)
    params = {"max_depth": depth, "eta": 0.3, "objective": objective, "nthread": 1, **extra}
    return xgb.train(params, xgb.DMatrix(x, label=y, missing=np.nan), rounds)


def rows_for(bst) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 6)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[:, 5] = rng.integers(0, 2, 3000)
    x[::11, 2] = np.inf
    x[::13, 3] = -np.inf
    return x


@pytest.mark.parametrize("depth", [1, 2, 5, 8])
@pytest.mark.parametrize("objective", ["binary:logistic", "binary:logitraw"])
def test_forest_equals_xgboost(depth: int, objective: str):
    bst = booster(depth, objective, gamma=0.5 if depth == 5 else 0.0)
    forest = Forest.from_xgboost(bst)
    assert forest is not None
    for x in (rows_for(bst), forest.probe()):
        np.testing.assert_allclose(forest.predict(x), bst.inplace_predict(x), rtol=0, atol=2e-6)


def test_forest_folds_single_leaf_trees_into_the_bias():
    bst = booster(5, gamma=50.0, rounds=40)  # a large gamma prunes many trees to a leaf
    forest = Forest.from_xgboost(bst)
    assert forest is not None and len(forest.depth) < 40
    x = rows_for(bst)
    np.testing.assert_allclose(forest.predict(x), bst.inplace_predict(x), atol=2e-6)


def test_models_the_kernel_does_not_do_stay_with_xgboost(monkeypatch):
    assert Forest.from_xgboost(booster(3, "multi:softprob", num_class=3)) is None
    assert Forest.from_xgboost(booster(3, "reg:squarederror")) is None
    assert Forest.from_xgboost(booster(3, booster="dart")) is None
    assert Forest.from_xgboost(booster(5)) is not None
    monkeypatch.setattr(native, "MAX_DEPTH", 4)  # 2^depth leaves per tree: deep ones stay
    assert Forest.from_xgboost(booster(5)) is None
    predictor = XGBoostPredictor(booster(3, "reg:squarederror"))
    assert predictor.forest is None and predictor.scorer == "xgboost"
    x = rows_for(predictor.booster)
    np.testing.assert_array_equal(predictor.predict(x), predictor.booster.inplace_predict(x))


def test_categorical_splits_stay_with_xgboost():
    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(0, 4, 500), rng.random(500)], axis=1)
    y = ((x[:, 0] % 2 == 0) ^ (x[:, 1] > 0.5)).astype(int)
    dtrain = xgb.DMatrix(x, label=y, feature_types=["c", "q"], enable_categorical=True)
    params = {"max_depth": 3, "objective": "binary:logistic", "max_cat_to_onehot": 1}
    assert Forest.from_xgboost(xgb.train(params, dtrain, 5)) is None


def test_xgboost_predictor_uses_the_forest_and_checks_it():
    predictor = XGBoostPredictor(booster(5))
    assert predictor.forest is not None and predictor.scorer == "recsql-forest"
    x = rows_for(predictor.booster)
    np.testing.assert_allclose(
        predictor.predict(x), predictor.booster.inplace_predict(x), atol=2e-6
    )
    assert predictor.predict(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="matrix"):
        predictor.forest.predict(x[:, :3])


# ---------------------------------------------------------------- format_scores


def python_format(values: np.ndarray, sep: str, null: str) -> bytes:
    return "".join((f"{v:.7g}" if np.isfinite(v) else null) + sep for v in values.tolist()).encode()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True), max_size=20))
def test_scores_format_as_python_does(values):
    array = np.array(values, np.float64)
    assert native.format_scores(array, b"\n", b"") == python_format(array, "\n", "")
    assert native.format_scores(array, b",", b"null") == python_format(array, ",", "null")


def test_scores_format_as_python_does_near_every_rounding_edge():
    rng = np.random.default_rng(0)
    probabilities = rng.random(200_000)
    scores = rng.normal(0, 50, 50_000)
    # Values on and next to 7-digit ties and powers of ten, where rounding is decided.
    ties = (rng.integers(1_000_000, 10_000_000, 20_000) + 0.5) * 10.0 ** rng.integers(
        -10, 1, 20_000
    )
    edges = np.concatenate([10.0 ** np.arange(-6, 9), 9.9999995 * 10.0 ** np.arange(-6, 8)])
    near = np.concatenate([ties, edges])
    near = np.concatenate([near, np.nextafter(near, 0), np.nextafter(near, 2 * near)])
    for values in (probabilities, scores, near, -near, probabilities.astype(np.float32)):
        values = np.asarray(values, np.float64)
        assert native.format_scores(values, b"\n", b"") == python_format(values, "\n", "")


def test_a_forest_that_disagrees_with_xgboost_is_not_used(monkeypatch, caplog):
    monkeypatch.setattr(Forest, "predict", lambda self, x: np.full(len(x), 0.5))
    predictor = XGBoostPredictor(booster(5))
    assert predictor.forest is None and predictor.scorer == "xgboost"
    assert "differs from XGBoost" in caplog.text
    x = rows_for(predictor.booster)
    np.testing.assert_array_equal(predictor.predict(x), predictor.booster.inplace_predict(x))


def test_a_missing_build_is_a_clear_load_error(monkeypatch):
    from model.errors import ArtifactError

    monkeypatch.setattr(native.importlib.machinery, "EXTENSION_SUFFIXES", [".absent.so"])
    with pytest.raises(ArtifactError, match=r"not built; reinstall recsql"):
        native.library.__wrapped__()  # the uncached loader


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=0, max_size=300))
def test_variant_fractions_are_md5_of_the_decimal_id(ids: list[int]) -> None:
    # the C kernel against hashlib: the routing rule model/variants.py documents
    got = native.variant_fractions(np.array(ids, dtype=np.int64))
    want = [int(hashlib.md5(str(u).encode()).hexdigest()[:13], 16) / 2**52 for u in ids]
    assert got.tolist() == want
