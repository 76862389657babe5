"""ctypes bindings for model/_native.c, the compiled half of tabular scoring.

    CsvEncoder     a header-less CSV body -> the float32 feature matrix, one pass in C
    Forest         an XGBoost tree ensemble as perfect binary trees, scored in C
    format_scores  scores -> "%.7g" text for reply bodies, as Python formats them
    variant_fractions  user ids -> their variant routing fractions (model/variants.py)

The kernels are built at install time (setup.py) and loaded on first use, so a
missing build fails a tabular model load with a message, not `import model`. C trusts
its arguments: every array it gets is made here, with its dtype, layout and
size fixed, and the indices inside (feature numbers, one-hot targets) checked
against the matrix width first.

Why our own tree walker, when XGBoost ships a predictor: it is still faster (bank-full
preset, 100 trees of depth 5, one thread, 2026-12-03: 2.56M rows/s against 0.99M for
`inplace_predict` at 1,000 rows, 142k against 10k at one row; bench/bench_tabular.py),
and it is checked against XGBoost at every model load. Libraries that compile a model
into native code (treelite / tl2cgen) would be as fast, but loading such a model runs
a shared library that came with the artifact; here the model stays data (XGBoost's
JSON), read by code that ships with recsql.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import logging
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import ArtifactError

log = logging.getLogger(__name__)

ABI = 2  # RECSQL_NATIVE_ABI in _native.c
MAX_DEPTH = 12  # deeper trees stay with XGBoost's own predictor (2^depth leaves each)
_TRANSFORMS = {"binary:logistic": 1, "reg:logistic": 1, "binary:logitraw": 0}
_P = ctypes.c_void_p
_I32, _I64, _F64 = ctypes.c_int32, ctypes.c_int64, ctypes.c_double


@cache
def library() -> ctypes.CDLL:
    """The built kernels; ArtifactError (at model load) when they are missing or stale."""
    here = Path(__file__).resolve().parent
    paths = [here / f"_native{s}" for s in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise ArtifactError(
            "recsql's compiled part (model/_native.c) is not built; reinstall recsql"
            " (`pip install -e .`, which needs a C compiler)"
        )
    lib = ctypes.CDLL(str(path))
    if lib.recsql_native_abi() != ABI:
        raise ArtifactError(f"{path} is a stale build of model/_native.c; reinstall recsql")
    lib.recsql_csv_encode.restype = _I64
    lib.recsql_csv_encode.argtypes = [_P, _I64, _I64, _I32] + [_P] * 8 + [_I32, _P, _P]
    lib.recsql_count_records.restype = _I64
    lib.recsql_count_records.argtypes = [_P, _I64]
    lib.recsql_format_scores.restype = _I64
    lib.recsql_format_scores.argtypes = [_P, _I64, ctypes.c_char, ctypes.c_char_p, _I64, _P]
    lib.recsql_variant_fractions.restype = None
    lib.recsql_variant_fractions.argtypes = [_P, _I64, _P]
    lib.recsql_forest_predict.restype = None
    lib.recsql_forest_predict.argtypes = [_P, _I64, _I64, _I32] + [_P] * 7 + [_F64, _I32, _P]
    return lib


def _ptr(array: np.ndarray) -> int:
    return array.ctypes.data


def _addresses(*arrays: np.ndarray) -> list[int]:
    """The arrays' addresses, taken once: the caller keeps the arrays alive."""
    return [_ptr(a) for a in arrays]


def count_records(body: bytes) -> int:
    """The number of CSV/JSON-lines records in `body`: its lines, split on "\\n", a
    final newline not starting another one (serve/records.py's rule)."""
    body = bytes(body)
    if len(body) < 4096:  # a C call costs more than counting a short body here
        return body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)
    return int(library().recsql_count_records(body, len(body)))


def format_scores(values: np.ndarray, sep: bytes, null: bytes) -> bytes:
    """Each value as f"{v:.7g}" (non-finite: `null`), each followed by `sep`."""
    scores = np.ascontiguousarray(values, np.float64)
    if len(sep) != 1:
        raise ValueError("sep must be one byte")
    out = np.empty(len(scores) * (32 + len(null)), np.uint8)
    length = library().recsql_format_scores(
        _ptr(scores), len(scores), sep, null, len(null), _ptr(out)
    )
    return out[:length].tobytes()


def variant_fractions(user_ids: np.ndarray) -> np.ndarray:
    """model/variants.py's routing fraction of each id (the top 52 bits of MD5 of its
    decimal text, over 2**52), about 10x faster than hashlib one id at a time."""
    ids = np.ascontiguousarray(user_ids, np.int64)
    out = np.empty(len(ids), np.float64)
    library().recsql_variant_fractions(_ptr(ids), len(ids), _ptr(out))
    return out


# ---------------------------------------------------------------- CSV -> matrix


class CsvEncoder:
    """Header-less CSV records -> (n, width) float32 matrix, as `Encoder.encode` would.

    `columns` are (offset, categories or None) in record order: a numeric
    column's value goes to matrix column `offset` (a `missing` token -> NaN), a
    categorical one sets 1.0 at offset + its category's position (unseen: zeros).
    A record C cannot read exactly as the general path would (quotes, non-ASCII,
    a wrong field count, a number like " 5" or "inf") comes back deferred: its
    row is zero and the caller encodes it the general way.
    """

    def __init__(
        self,
        columns: Sequence[tuple[int, Sequence[str] | None]],
        missing: Sequence[str],
        width: int,
    ) -> None:
        self.lib = library()
        self.width = width
        self.n_cols = len(columns)
        tokens: list[bytes] = []
        targets: list[int] = []
        slot_start: list[int] = []
        slot_mask: list[int] = []
        slots: list[int] = []
        for offset, categories in columns:
            if categories is None:
                texts = [m.encode() for m in dict.fromkeys(missing)]
                column_targets = [offset] * len(texts)
            else:
                texts = [c.encode() for c in categories]
                column_targets = list(range(offset, offset + len(texts)))
            table = _slot_table(texts, first_token=len(tokens))
            slot_start.append(len(slots))
            slot_mask.append(len(table) - 1)
            slots += table
            tokens += texts
            targets += column_targets
        self.categorical = np.array([c is not None for _, c in columns], np.uint8)
        self.numeric_column = np.array([o for o, _ in columns], np.int32)
        self.slot_start = np.array(slot_start or [0], np.int32)
        self.slot_mask = np.array(slot_mask or [0], np.int32)
        self.slots = np.array(slots or [-1], np.int32)
        self.token_bytes = np.cumsum([0] + [len(t) for t in tokens], dtype=np.int64)
        self.token_text = np.frombuffer(b"".join(tokens) + b"\0", np.uint8)
        self.token_target = np.array(targets or [0], np.int32)
        for index in (self.numeric_column, self.token_target):
            if len(index) and not (0 <= index.min() and index.max() < max(width, 1)):
                raise ArtifactError("tabular encoding: a column offset lies outside the matrix")
        self._tables = _addresses(
            self.categorical,
            self.numeric_column,
            self.slot_start,
            self.slot_mask,
            self.slots,
            self.token_bytes,
            self.token_text,
            self.token_target,
        )

    def encode(self, body: bytes, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(matrix, deferred): `n_rows` must be the body's record count."""
        body = bytes(body)  # a no-op for bytes; C reads it in place
        matrix = np.zeros((n_rows, self.width), np.float32)
        deferred = np.zeros(n_rows, np.uint8)
        seen = self.lib.recsql_csv_encode(
            body,
            len(body),
            n_rows,
            self.n_cols,
            *self._tables,
            self.width,
            _ptr(matrix),
            _ptr(deferred),
        )
        if seen != n_rows:
            raise ValueError(f"the body holds {seen} records, not {n_rows}")
        return matrix, deferred.view(bool)


def _slot_hash(text: bytes) -> int:
    """slot_hash in _native.c: the length and three bytes of a field."""
    n = len(text)
    if n == 0:
        return 0
    h = (n * 0x9E3779B1) & 0xFFFFFFFF
    h ^= (text[0] * 0x85EBCA77) & 0xFFFFFFFF
    h ^= (text[-1] * 0xC2B2AE3D) & 0xFFFFFFFF
    h ^= (text[n // 2] * 0x27D4EB2F) & 0xFFFFFFFF
    return h ^ (h >> 15)


def _slot_table(texts: list[bytes], first_token: int) -> list[int]:
    """An open-addressing table (linear probing, at most half full) of token indices."""
    size = 2
    while size < 2 * len(texts):
        size *= 2
    table = [-1] * size
    for i, text in enumerate(texts):
        slot = _slot_hash(text) & (size - 1)
        while table[slot] != -1:
            slot = (slot + 1) & (size - 1)
        table[slot] = first_token + i
    return table


# ---------------------------------------------------------------- tree ensembles


class Forest:
    """A tree ensemble in the layout `recsql_forest_predict` walks (see _native.c).

    Built from XGBoost's JSON model: numerical splits (go left when value <
    threshold, NaN follows the default branch), one output, all trees summed
    in order on top of the base margin, then the objective's link.
    Single-leaf trees are constants and go into the bias.
    """

    def __init__(
        self,
        trees: list[dict[str, Any]],
        tree_depths: list[int],
        bias: float,
        transform: int,
        width: int,
    ):
        depths, features, thresholds, defaults, leaves = [], [], [], [], []
        for tree, depth in zip(trees, tree_depths, strict=True):
            if depth == 0:
                bias += float(np.float32(tree["split_conditions"][0]))
                continue
            arrays = _perfect(tree, depth)
            depths.append(depth)
            for out, array in zip((features, thresholds, defaults, leaves), arrays, strict=True):
                out.append(array)
        self.lib = library()
        self.width = width
        self.bias = bias
        self.transform = transform
        self.depth = np.array(depths, np.int32)
        self.node_offset = _offsets(features)
        self.leaf_offset = _offsets(leaves)
        self.feature = _joined(features, np.int32)
        self.threshold = _joined(thresholds, np.float32)
        self.default_left = _joined(defaults, np.uint8)
        self.leaf_value = _joined(leaves, np.float32)
        if len(self.feature) and not (0 <= self.feature.min() and self.feature.max() < width):
            raise ArtifactError("XGBoost model: a split uses a feature outside the input width")
        self._tables = _addresses(
            self.depth,
            self.node_offset,
            self.leaf_offset,
            self.feature,
            self.threshold,
            self.default_left,
            self.leaf_value,
        )

    @classmethod
    def from_xgboost(cls, booster: Any) -> Forest | None:
        """The booster as a Forest; None when it uses something the kernel does not do
        (categorical splits, several outputs, dart, another objective, very deep trees)."""
        doc = json.loads(booster.save_raw("json"))
        learner = doc["learner"]
        params = learner["learner_model_param"]
        booster_doc = learner["gradient_booster"]
        objective = learner["objective"]["name"]
        if (
            booster_doc.get("name") != "gbtree"
            or objective not in _TRANSFORMS
            or int(params.get("num_class", 0)) > 1
            or int(params.get("num_target", 1)) != 1
        ):
            return None
        trees = booster_doc["model"]["trees"]
        if any(any(t.get("split_type", [])) for t in trees):
            return None
        depths = [_depth(t) for t in trees]
        if max(depths, default=0) > MAX_DEPTH:
            return None
        base = float(str(params["base_score"]).strip("[]"))
        transform = _TRANSFORMS[objective]
        if transform == 1 and not 0.0 < base < 1.0:
            return None  # no finite margin: leave the edge case to XGBoost
        margin = math.log(base / (1.0 - base)) if transform == 1 else base
        return cls(trees, depths, margin, transform, int(params["num_feature"]))

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(matrix, np.float32)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"expected a (rows, {self.width}) matrix, got {x.shape}")
        out = np.empty(len(x), np.float64)
        self.lib.recsql_forest_predict(
            _ptr(x),
            len(x),
            self.width,
            len(self.depth),
            *self._tables,
            self.bias,
            self.transform,
            _ptr(out),
        )
        return out

    def probe(self) -> np.ndarray:
        """Rows that reach every side of every split: each feature takes a threshold,
        a value just below one, or NaN. For checking the layout against XGBoost."""
        rng = np.random.default_rng(0)
        rows = 512
        x = np.full((rows, self.width), np.nan, np.float32)
        for j in range(self.width):
            cuts = self.threshold[self.feature == j]
            if len(cuts) == 0:
                cuts = np.zeros(1, np.float32)
            values = np.concatenate([cuts, np.nextafter(cuts, np.float32(-np.inf)), [np.nan]])
            x[:, j] = rng.choice(values.astype(np.float32), rows)
        return x


def _depth(tree: dict[str, Any]) -> int:
    """Levels of split nodes below the root (0 for a single leaf)."""
    left, right = tree["left_children"], tree["right_children"]
    deepest, stack = 0, [(0, 0)]
    while stack:
        node, level = stack.pop()
        if level > len(left):
            raise ArtifactError("XGBoost model: a tree's children form a cycle")
        if left[node] == -1:
            deepest = max(deepest, level)
        else:
            stack += [(left[node], level + 1), (right[node], level + 1)]
    return deepest


def _perfect(tree: dict[str, Any], depth: int) -> tuple[np.ndarray, ...]:
    """feature, threshold, default_left over the 2^depth - 1 split slots, and the
    2^depth leaf values (a shallower leaf repeated over the leaves below it)."""
    left, right = tree["left_children"], tree["right_children"]
    split_index, condition = tree["split_indices"], tree["split_conditions"]
    default_left = tree["default_left"]
    slots = (1 << depth) - 1
    feature = np.zeros(slots, np.int32)
    threshold = np.zeros(slots, np.float32)
    default = np.zeros(slots, np.uint8)
    leaves = np.zeros(1 << depth, np.float32)
    stack = [(0, 0, 0)]  # (node, slot, level)
    while stack:
        node, slot, level = stack.pop()
        if left[node] == -1:
            first = slot
            for _ in range(depth - level):
                first = 2 * first + 1
            first -= slots
            leaves[first : first + (1 << (depth - level))] = condition[node]
            continue
        feature[slot] = split_index[node]
        threshold[slot] = condition[node]
        default[slot] = 1 if default_left[node] else 0
        stack.append((left[node], 2 * slot + 1, level + 1))
        stack.append((right[node], 2 * slot + 2, level + 1))
    return feature, threshold, default, leaves


def _offsets(arrays: list[np.ndarray]) -> np.ndarray:
    return np.cumsum([0] + [len(a) for a in arrays[:-1]], dtype=np.int64)


def _joined(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(1, dtype)
