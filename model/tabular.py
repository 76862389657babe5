"""Tabular binary classifiers (XGBoost, LightGBM, logistic regression) behind one interface.

    model_dir/
      recsql.json     kind "tabular": family, model_file, feature_names (input column order),
                      label, classes [negative, positive], the encoding (numeric columns,
                      categorical vocabularies), missing-value tokens, training config, metrics
      model.ubj       XGBoost booster (UBJSON)          family "xgboost" (or model.json)
      model.txt       LightGBM text model               family "lightgbm"
      logistic.json   coefficients + scaler statistics  family "logistic"
      leaderboard.csv, fit_summary.txt, model_performance.txt, test_prediction.csv,
      eval.png        written by training, not needed to serve

The encoding lives in the manifest, so training and serving encode alike: a
numeric column becomes one float (a missing token -> NaN, which the boosters
route by their learned default and logistic regression imputes with the
training mean); a categorical column becomes one-hot columns over its
training vocabulary (an unseen or missing value -> all zeros). A row with a
value that is neither a number nor a missing token in a numeric column cannot
be scored: its probability is NaN (an empty output line).

The loader refuses, with an ArtifactError:
- a `model_file` that is not the one safe file name of its family (so a
  pickle, joblib, .pt or any other file is never opened), a model file that
  starts like a pickle, and any `*.pkl`, `*.pickle`, `*.joblib` or `*.sav`
  file in the directory (recsql never loads them; remove them);
- a family other than xgboost, lightgbm or logistic;
- a feature mismatch: model inputs that do not match the manifest's encoding
  width, duplicate or missing feature names, classes that are not two labels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from model.errors import ArtifactError, BadRequest, first_line
from model.format import write_manifest
from model.native import CsvEncoder, Forest

log = logging.getLogger(__name__)

MISSING_TOKENS = ("", "?", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")
MODEL_FILES = {
    "xgboost": ("model.ubj", "model.json"),
    "lightgbm": ("model.txt",),
    "logistic": ("logistic.json",),
}
_UNSAFE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav")


# ---------------------------------------------------------------- encoding


@dataclass
class Column:
    """One input column: numeric (categories None) or categorical with its vocabulary."""

    name: str
    categories: list[str] | None = None
    offset: int = 0  # first encoded column
    index: dict[str, int] = field(default_factory=dict, repr=False)  # category -> encoded col

    @property
    def width(self) -> int:
        return 1 if self.categories is None else len(self.categories)

    def to_json(self) -> dict[str, Any]:
        if self.categories is None:
            return {"name": self.name, "type": "numeric"}
        return {"name": self.name, "type": "categorical", "categories": self.categories}


class Encoder:
    """Raw columns (str/object/float arrays) -> float32 matrix, vectorised per column."""

    def __init__(self, columns: list[Column], missing: Sequence[str] = MISSING_TOKENS) -> None:
        names = [c.name for c in columns]
        if len(set(names)) != len(names):
            raise ArtifactError("duplicate feature names in the tabular encoding")
        self.columns = columns
        self.missing = tuple(missing)
        self._missing_set = frozenset(self.missing)
        offset = 0
        for col in columns:
            col.offset = offset
            if col.categories is not None:
                col.index = {cat: offset + i for i, cat in enumerate(col.categories)}
                if len(col.index) != len(col.categories):
                    raise ArtifactError(f"column {col.name!r}: duplicate categories")
            offset += col.width
        self.width = offset

    @property
    def feature_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def encoded_names(self) -> list[str]:
        out: list[str] = []
        for col in self.columns:
            out += (
                [col.name]
                if col.categories is None
                else [f"{col.name}={c}" for c in col.categories]
            )
        return out

    @classmethod
    def fit(
        cls,
        names: Sequence[str],
        columns: Sequence[np.ndarray],
        max_categories: int = 64,
        min_count: int = 2,
        missing: Sequence[str] = MISSING_TOKENS,
    ) -> Encoder:
        """Numeric when every non-missing value parses as a number; else categorical,
        keeping the `max_categories` most frequent values seen >= `min_count` times."""
        specs = []
        missing_set = frozenset(missing)
        for name, values in zip(names, columns, strict=True):
            if _is_numeric(values, missing_set):
                specs.append(Column(name))
                continue
            cats, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
            order = sorted(range(len(cats)), key=lambda i: (-counts[i], str(cats[i])))
            keep = [str(cats[i]) for i in order if counts[i] >= min_count][:max_categories]
            specs.append(Column(name, keep))
        return cls(specs, missing)

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": [c.to_json() for c in self.columns],
            "missing_values": list(self.missing),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Encoder:
        try:
            columns = []
            for spec in doc["columns"]:
                if spec["type"] == "numeric":
                    columns.append(Column(str(spec["name"])))
                elif spec["type"] == "categorical":
                    columns.append(Column(str(spec["name"]), [str(c) for c in spec["categories"]]))
                else:
                    raise ArtifactError(f"unknown column type {spec['type']!r}")
            return cls(columns, [str(t) for t in doc.get("missing_values", MISSING_TOKENS)])
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"tabular encoding is malformed ({exc!r})") from exc

    def encode(self, columns: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(n, width) float32 matrix and the mask of rows that could be encoded."""
        if len(columns) != len(self.columns):
            raise BadRequest(
                f"got {len(columns)} columns; this model needs {len(self.columns)}"
                f" ({', '.join(self.feature_names)})"
            )
        n = len(columns[0]) if len(columns) else 0
        matrix = np.zeros((n, self.width), np.float32)
        ok = np.ones(n, bool)
        flat = matrix.reshape(-1)
        row_starts = np.arange(n, dtype=np.intp) * self.width
        for col, values in zip(self.columns, columns, strict=True):
            if len(values) != n:
                raise BadRequest("feature columns have different lengths")
            if col.categories is None:
                numbers, good = self._numeric(values)
                with np.errstate(over="ignore"):  # beyond float32: inf, as in C
                    matrix[:, col.offset] = numbers
                ok &= good
            else:
                target = self._lookup(col, values)
                hit = target >= 0
                flat[row_starts[hit] + target[hit]] = 1.0
        return matrix, ok

    def _numeric(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = np.asarray(values)
        n = len(arr)
        try:  # fast path: every value is a number or a number's text
            return arr.astype(np.float64), np.ones(n, bool)
        except (ValueError, TypeError):
            pass
        out = np.empty(n, np.float64)
        good = np.ones(n, bool)
        missing = self._missing_set
        for i, value in enumerate(arr.tolist()):
            if value is None or (isinstance(value, str) and value.strip() in missing):
                out[i] = np.nan
                continue
            try:
                if isinstance(value, bool | list | dict):
                    raise TypeError
                out[i] = float(value)
            except (ValueError, TypeError, OverflowError):
                out[i], good[i] = np.nan, False
        return out, good

    def _lookup(self, col: Column, values: np.ndarray) -> np.ndarray:
        """Encoded column of each value (-1 unseen/missing): one C-level dict pass."""
        target = np.fromiter(map(col.index.get, values, repeat(-1)), np.intp, len(values))
        for i in np.flatnonzero(target < 0).tolist():
            value = values[i]  # JSON numbers for a categorical column: compare as text
            if not isinstance(value, str) and value is not None:
                target[i] = col.index.get(_as_text(value), -1)
        return target

    @cached_property
    def _csv(self) -> CsvEncoder:
        columns = [(c.offset, c.categories) for c in self.columns]
        return CsvEncoder(columns, self.missing, self.width)

    def encode_csv(self, body: bytes, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Header-less CSV records (features in column order) -> (matrix, deferred), in C.

        A deferred row is zero: its record needs the general path (`encode` on
        the fields a CSV parser reads from it), because it is quoted, not ASCII,
        has the wrong number of fields, or holds a numeric field that is not a
        plain decimal number or a missing token (" 5", "inf", "abc").
        """
        return self._csv.encode(body, n_rows)


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_numeric(values: np.ndarray, missing: frozenset[str]) -> bool:
    seen = False
    for value in np.unique(np.asarray(values, dtype=str)).tolist():
        if value.strip() in missing:
            continue
        try:
            float(value)
        except ValueError:
            return False
        seen = True
    return seen


# ---------------------------------------------------------------- predictors


class Predictor(Protocol):
    family: str
    num_features: int

    def predict(self, matrix: np.ndarray) -> np.ndarray: ...

    def save(self, model_dir: Path) -> str: ...


class XGBoostPredictor:
    """Scores with model/native.py's Forest, the same trees walked about twice as fast
    as XGBoost's own one-thread predictor; models it cannot lay out (categorical
    splits, multi-output, dart) or that fail its check stay with XGBoost."""

    family = "xgboost"

    def __init__(self, booster: Any, threads: int = 1) -> None:
        booster.set_param({"nthread": threads})
        self.booster = booster
        self.num_features = int(booster.num_features())
        self.forest = _checked_forest(booster)

    @property
    def scorer(self) -> str:
        """What walks the trees: "recsql-forest" (model/native.py) or "xgboost"."""
        return "recsql-forest" if self.forest is not None else "xgboost"

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        if len(matrix) == 0:
            return np.empty(0, np.float64)
        if self.forest is not None:
            return self.forest.predict(matrix)
        return np.asarray(self.booster.inplace_predict(matrix), np.float64)

    def save(self, model_dir: Path) -> str:
        self.booster.save_model(str(Path(model_dir) / "model.ubj"))
        return "model.ubj"

    @classmethod
    def load(cls, path: Path) -> XGBoostPredictor:
        import xgboost as xgb

        return cls(xgb.Booster(model_file=str(path)))


def _checked_forest(booster: Any) -> Forest | None:
    """The booster's Forest, if it reproduces XGBoost on rows that take every branch."""
    forest = Forest.from_xgboost(booster)
    if forest is None:
        return None
    probe = forest.probe()
    expected = np.asarray(booster.inplace_predict(probe), np.float64)
    gap = float(np.max(np.abs(forest.predict(probe) - expected), initial=0.0))
    if not gap <= 1e-5:
        log.warning("native tree layout differs from XGBoost by %.3g; using XGBoost's", gap)
        return None
    return forest


class LightGBMPredictor:
    family = "lightgbm"

    def __init__(self, booster: Any) -> None:
        self.booster = booster
        self.num_features = int(booster.num_feature())

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        if len(matrix) == 0:
            return np.empty(0, np.float64)
        return np.asarray(self.booster.predict(matrix, num_threads=1), np.float64)

    def save(self, model_dir: Path) -> str:
        self.booster.save_model(str(Path(model_dir) / "model.txt"))
        return "model.txt"

    @classmethod
    def load(cls, path: Path) -> LightGBMPredictor:
        import lightgbm as lgb

        return cls(lgb.Booster(model_file=str(path)))


class LogisticPredictor:
    """sigmoid(((x - center) / scale) @ coef + intercept); NaN inputs take `center`."""

    family = "logistic"

    def __init__(
        self, coef: np.ndarray, intercept: float, center: np.ndarray, scale: np.ndarray
    ) -> None:
        self.coef = np.asarray(coef, np.float64)
        self.intercept = float(intercept)
        self.center = np.asarray(center, np.float64)
        self.scale = np.asarray(scale, np.float64)
        if not (self.coef.ndim == 1 and self.coef.shape == self.center.shape == self.scale.shape):
            raise ArtifactError("logistic.json: coef, center and scale must be equal-length lists")
        self.num_features = len(self.coef)
        self._weights = self.coef / self.scale  # folded once: predict is one mat-vec
        self._bias = self.intercept - float(self.center @ self._weights)

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        x = np.asarray(matrix, np.float64)
        nan = np.isnan(x)
        if nan.any():
            x = np.where(nan, self.center, x)
        z = x @ self._weights + self._bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def save(self, model_dir: Path) -> str:
        doc = {
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
        }
        (Path(model_dir) / "logistic.json").write_text(json.dumps(doc))
        return "logistic.json"

    @classmethod
    def load(cls, path: Path) -> LogisticPredictor:
        try:
            doc = json.loads(Path(path).read_text())
            return cls(doc["coef"], doc["intercept"], doc["center"], doc["scale"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path}: cannot read logistic coefficients ({exc})") from exc


_PREDICTORS: dict[str, Any] = {
    "xgboost": XGBoostPredictor,
    "lightgbm": LightGBMPredictor,
    "logistic": LogisticPredictor,
}


# ---------------------------------------------------------------- the model


class TabularModel:
    """A binary classifier over named raw columns: P(classes[1]) per row."""

    kind = "tabular"

    def __init__(
        self,
        encoder: Encoder,
        predictor: Predictor,
        classes: Sequence[str],
        label: str = "label",
        info: dict[str, Any] | None = None,
    ) -> None:
        if len(classes) != 2 or len(set(map(str, classes))) != 2:
            raise ArtifactError(f"a tabular model needs two distinct classes, not {list(classes)}")
        if predictor.num_features != encoder.width:
            raise ArtifactError(
                f"feature mismatch: the {predictor.family} model takes {predictor.num_features}"
                f" inputs but the encoding makes {encoder.width}"
            )
        self.encoder = encoder
        self.predictor = predictor
        self.classes = [str(c) for c in classes]
        self.label = label
        self.info = dict(info or {})

    @property
    def feature_names(self) -> list[str]:
        return self.encoder.feature_names

    @property
    def family(self) -> str:
        return self.predictor.family

    def predict_columns(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        """float64 P(positive) per row; NaN where a row cannot be encoded."""
        return self.predict_encoded(*self.encoder.encode(columns))

    def predict_encoded(self, matrix: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """P(positive) per row of an encoded matrix; NaN where `ok` is False."""
        probs = self.predictor.predict(matrix)
        if not ok.all():
            probs[~ok] = np.nan
        return probs

    def predict_rows(self, rows: Sequence[Sequence[Any]]) -> np.ndarray:
        """Convenience for small inputs: rows of raw values in feature order."""
        width = len(self.feature_names)
        if any(len(r) != width for r in rows):
            raise BadRequest(f"every row needs {width} values ({', '.join(self.feature_names)})")
        columns = [np.array([r[j] for r in rows], dtype=object) for j in range(width)]
        return self.predict_columns(columns)

    def describe(self) -> dict[str, Any]:
        cats = {c.name: len(c.categories) for c in self.encoder.columns if c.categories is not None}
        return {
            "kind": self.kind,
            "family": self.family,
            "scorer": getattr(self.predictor, "scorer", self.family),
            "inputs": self.feature_names,
            "label": self.label,
            "classes": self.classes,
            "numeric": [c.name for c in self.encoder.columns if c.categories is None],
            "categorical": cats,
            "encoded_width": self.encoder.width,
            "metrics": self.info.get("metrics", {}),
        }

    def save(self, model_dir: Path, **manifest_fields: Any) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        model_file = self.predictor.save(model_dir)
        write_manifest(
            model_dir,
            "tabular",
            family=self.family,
            model_file=model_file,
            feature_names=self.feature_names,
            label=self.label,
            classes=self.classes,
            encoding=self.encoder.to_json(),
            **manifest_fields,
        )
        return model_dir


def load_tabular(model_dir: Path, manifest: dict[str, Any]) -> TabularModel:
    """The loader `model.load_model` calls for a manifest of kind `tabular`."""
    model_dir = Path(model_dir)
    unsafe = sorted(p.name for p in model_dir.iterdir() if p.suffix.lower() in _UNSAFE_SUFFIXES)
    if unsafe:
        raise ArtifactError(
            f"{model_dir}: refusing a model directory with pickle/joblib files"
            f" ({', '.join(unsafe)}); recsql never loads them: remove them"
        )
    family = manifest.get("family")
    if family not in _PREDICTORS:
        raise ArtifactError(
            f"{model_dir}: unknown tabular family {family!r}; known: {', '.join(_PREDICTORS)}"
        )
    model_file = manifest.get("model_file")
    if model_file not in MODEL_FILES[family]:
        raise ArtifactError(
            f"{model_dir}: refusing model_file {model_file!r} for {family}; it must be one of"
            f" {', '.join(MODEL_FILES[family])} (no pickle/joblib)"
        )
    path = model_dir / model_file
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the model file ({exc})") from exc
    if head[:1] == b"\x80":
        raise ArtifactError(f"{path}: looks like a pickle; refusing to load it")
    encoder = Encoder.from_json(manifest.get("encoding") or {})
    if list(manifest.get("feature_names", [])) != encoder.feature_names:
        raise ArtifactError(f"{model_dir}: feature_names do not match the encoding's columns")
    encoder.encode_csv(b"", 0)  # builds the C decoder now: a missing build fails the load
    try:
        predictor = _PREDICTORS[family].load(path)
    except ArtifactError:
        raise
    except Exception as exc:  # xgboost/lightgbm raise their own error types
        first = first_line(exc)
        raise ArtifactError(f"{path}: cannot load the {family} model ({first[:200]})") from exc
    return TabularModel(
        encoder,
        predictor,
        manifest.get("classes", []),
        label=str(manifest.get("label", "label")),
        info={k: v for k, v in manifest.items() if k != "encoding"},
    )
