"""Train a tabular binary classifier: the XGBoost preset, or AutoML over several families.

    CSV (header + --target, or headerless with the label first, the SageMaker
    built-in XGBoost convention) -> shuffled 70/30 split (fixed seed)
    -> encoding fitted on the training part (model/tabular.py's Encoder, saved
       in the manifest) -> candidates:
         preset "xgboost": the bank-marketing seed's booster, fitted once;
         preset "automl":  every candidate scored by k-fold CV on the training
                           part, refitted on all of it, the best by --metric wins
    -> model dir: the model (XGBoost UBJ / LightGBM text / logistic JSON, never
       pickle), recsql.json, and training/reports.py's leaderboard and reports.

The saved model is loaded back and must reproduce the in-memory test
predictions before the run counts as done.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.artifact import load_model
from model.errors import DataError
from model.progress import progress_bar
from model.tabular import (
    Encoder,
    LightGBMPredictor,
    LogisticPredictor,
    Predictor,
    TabularModel,
    XGBoostPredictor,
)
from training import reports

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

# The SageMaker bank-marketing (direct marketing) example's hyperparameters.
XGBOOST_PRESET: dict[str, Any] = {
    "max_depth": 5,
    "eta": 0.2,
    "gamma": 4,
    "min_child_weight": 6,
    "subsample": 0.8,
    "objective": "binary:logistic",
    "num_round": 100,
}
# AutoML candidates: name -> (family, hyperparameters). The preset is one of
# them, so the AutoML pick is never a family the preset would have beaten in CV.
AUTOML_CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "XGBoost_preset": ("xgboost", XGBOOST_PRESET),
    "XGBoost_deep": (
        "xgboost",
        {
            "max_depth": 6,
            "eta": 0.05,
            "subsample": 0.8,
            "colsample_bytree": 0.8,
            "min_child_weight": 1,
            "objective": "binary:logistic",
            "num_round": 400,
        },
    ),
    "LightGBM": (
        "lightgbm",
        {
            "num_leaves": 31,
            "learning_rate": 0.05,
            "feature_fraction": 0.8,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "min_data_in_leaf": 20,
            "num_round": 400,
        },
    ),
    "LogisticRegression": ("logistic", {"C": 1.0}),
}
FAMILIES = ("xgboost", "lightgbm", "logistic")
POSITIVE_NAMES = ("1", "yes", "true", "y", "t", "positive", "fraud")


@dataclass
class TabularConfig:
    preset: str = "xgboost"  # xgboost | automl
    target: str | None = None  # None: headerless CSV, label in the first column
    positive: str | None = None  # the positive class label (default: guessed, see _classes)
    drop: tuple[str, ...] = ()
    test_fraction: float = 0.3
    seed: int = 0
    folds: int = 5
    metric: str = "auc"
    families: tuple[str, ...] = FAMILIES
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # preset overrides
    max_rows: int | None = None  # train on a shuffled slice (tests, quick looks)
    threads: int = 0  # training threads (0: all cores); served models use one
    progress: bool = True


@dataclass
class Table:
    names: list[str]
    columns: list[np.ndarray]  # object arrays of str, one per feature
    labels: np.ndarray  # object array of str
    rows: np.ndarray  # data row number in the file (1-based), for test_prediction.csv


# ---------------------------------------------------------------- data


def _open_text(path: Path) -> io.TextIOBase:
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_table(path: Path, target: str | None, drop: Sequence[str] = ()) -> Table:
    """A CSV/.csv.gz (delimiter sniffed among , ; tab |) -> feature columns and labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with _open_text(path) as handle:
            sample = handle.read(65536)
            handle.seek(0)
            try:
                dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t|")
            except csv.Error:
                dialect = csv.excel
            records = [r for r in csv.reader(handle, dialect) if r]
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        raise DataError(f"{path}: cannot read the CSV ({exc})") from exc
    if target is None:
        names = [f"f{i}" for i in range(1, len(records[0]))] if records else []
        label_at = 0
    else:
        if not records:
            raise DataError(f"{path}: empty file; expected a header row")
        header, records = [h.strip() for h in records[0]], records[1:]
        if target not in header:
            raise DataError(f"{path}: no column {target!r}; columns: {', '.join(header)}")
        label_at = header.index(target)
        names = header[:label_at] + header[label_at + 1 :]
    width = len(names) + 1
    if len(records) < 10:
        raise DataError(f"{path}: {len(records)} data rows; need at least 10 to train")
    for i, record in enumerate(records):
        if len(record) != width:
            line = i + (1 if target is None else 2)
            raise DataError(f"{path}: record {line} has {len(record)} fields; expected {width}")
    matrix = np.array(records, dtype=object)
    labels = matrix[:, label_at]
    features = np.delete(matrix, label_at, axis=1)
    unknown = [d for d in drop if d not in names]
    if unknown:
        raise DataError(f"--drop: no column {', '.join(unknown)}; columns: {', '.join(names)}")
    keep = [j for j, n in enumerate(names) if n not in drop]
    return Table(
        [names[j] for j in keep],
        [np.ascontiguousarray(features[:, j]) for j in keep],
        labels,
        np.arange(1, len(records) + 1),
    )


def _classes(labels: np.ndarray, positive: str | None) -> tuple[list[str], np.ndarray]:
    """[negative, positive] and 0/1 targets; rows with an empty label get -1."""
    text = np.array([str(v).strip() for v in labels], dtype=object)
    present = sorted(set(text.tolist()) - {""})
    if len(present) != 2:
        shown = ", ".join(present[:5]) + (" ..." if len(present) > 5 else "")
        raise DataError(
            f"the label column must hold exactly 2 classes; found {len(present)}: {shown}"
        )
    if positive is None:
        named = [c for c in present if c.lower() in POSITIVE_NAMES]
        positive = named[0] if len(named) == 1 else present[1]
    if positive not in present:
        raise DataError(f"--positive {positive!r} is not a label; labels: {', '.join(present)}")
    negative = present[0] if present[1] == positive else present[1]
    y = np.where(text == positive, 1, np.where(text == negative, 0, -1))
    return [negative, positive], y.astype(np.int64)


def split(n: int, test_fraction: float, seed: int, max_rows: int | None = None):
    """Shuffled (train, test) row positions; `max_rows` takes a shuffled slice first."""
    order = np.random.default_rng(seed).permutation(n)
    if max_rows:
        order = order[:max_rows]
    n_test = int(round(len(order) * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


# ---------------------------------------------------------------- families


def fit(
    family: str, params: dict[str, Any], x: np.ndarray, y: np.ndarray, seed: int, threads: int = 0
) -> Predictor:
    """Fit one candidate on (x, y)."""
    threads = threads or (os.cpu_count() or 1)
    params = dict(params)
    if family == "xgboost":
        import xgboost as xgb

        rounds = int(params.pop("num_round", 100))
        params.update(seed=seed, nthread=threads, verbosity=0)
        dtrain = xgb.DMatrix(x, label=y, missing=np.nan, nthread=threads)
        return XGBoostPredictor(xgb.train(params, dtrain, num_boost_round=rounds))
    if family == "lightgbm":
        import lightgbm as lgb

        rounds = int(params.pop("num_round", 100))
        params.update(objective="binary", seed=seed, num_threads=threads, verbose=-1)
        return LightGBMPredictor(lgb.train(params, lgb.Dataset(x, label=y), rounds))
    if family == "logistic":
        from sklearn.linear_model import LogisticRegression

        with np.errstate(all="ignore"):
            center = np.nan_to_num(np.nanmean(x, axis=0))
        filled = np.where(np.isnan(x), center, x).astype(np.float64)
        scale = filled.std(axis=0)
        scale[~(scale > 0)] = 1.0
        lr = LogisticRegression(C=float(params.get("C", 1.0)), max_iter=2000)
        lr.fit((filled - center) / scale, y)
        return LogisticPredictor(lr.coef_[0], lr.intercept_[0], center, scale)
    raise DataError(f"unknown model family {family!r}; use {', '.join(FAMILIES)}")


def cross_validate(
    family: str,
    params: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    config: TabularConfig,
    bar: tqdm | None = None,
) -> list[float]:
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    scores = []
    for train_idx, val_idx in folds.split(x, y):
        predictor = fit(family, params, x[train_idx], y[train_idx], config.seed, config.threads)
        scores.append(reports.score(config.metric, y[val_idx], predictor.predict(x[val_idx])))
        if bar is not None:
            bar.update(1)
    return scores


def candidates(config: TabularConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    if config.preset == "xgboost":
        return {"XGBoost_preset": ("xgboost", {**XGBOOST_PRESET, **config.hyperparameters})}
    if config.preset == "automl":
        chosen = {k: v for k, v in AUTOML_CANDIDATES.items() if v[0] in config.families}
        if not chosen:
            raise DataError(f"--families {','.join(config.families)} selects no candidate")
        return chosen
    raise DataError(f"unknown preset {config.preset!r}; use xgboost or automl")


# ---------------------------------------------------------------- the run


def train_tabular(data: Path, model_dir: Path, config: TabularConfig) -> dict[str, Any]:
    """Train, pick, save and report; returns the summary written to fit_summary.txt."""
    if config.metric not in reports.METRICS:
        raise DataError(f"--metric {config.metric!r} unknown; use {', '.join(reports.METRICS)}")
    if not 0 < config.test_fraction < 1:
        raise DataError("--test-fraction must be between 0 and 1")
    start = time.perf_counter()
    table = read_table(data, config.target, config.drop)
    classes, y_all = _classes(table.labels, config.positive)
    labelled = np.flatnonzero(y_all >= 0)
    if len(labelled) < len(y_all):
        log.warning("%d rows without a label skipped", len(y_all) - len(labelled))
    train_pos, test_pos = split(len(labelled), config.test_fraction, config.seed, config.max_rows)
    train_rows, test_rows = labelled[train_pos], labelled[test_pos]
    y_train, y_test = y_all[train_rows], y_all[test_rows]
    if len(np.unique(y_train)) < 2 or len(np.unique(y_test)) < 2:
        raise DataError("both classes must appear in the training and the test part; use more rows")

    encoder = Encoder.fit(table.names, [c[train_rows] for c in table.columns])
    x_train, _ = encoder.encode([c[train_rows] for c in table.columns])
    test_columns = [c[test_rows] for c in table.columns]
    x_test, test_ok = encoder.encode(test_columns)

    entries, fitted = _fit_candidates(
        candidates(config), x_train, y_train, x_test, y_test, test_ok, config
    )
    best = max(
        entries, key=lambda e: (e.score_val if e.score_val is not None else 0.0, -e.fit_order)
    )
    model = TabularModel(encoder, fitted[best.model], classes, label=config.target or "label")
    prob = model.predict_columns(test_columns)
    perf = reports.performance(y_test[test_ok], prob[test_ok], classes)
    train_seconds = time.perf_counter() - start
    summary = {
        "data": str(data),
        "rows": f"{len(train_rows)} train / {len(test_rows)} test (seed {config.seed})",
        "features": f"{len(table.names)} inputs -> {encoder.width} encoded columns",
        "classes": f"{classes[0]} (0), {classes[1]} (1); positive rate "
        f"{y_train.mean():.4f} in train",
        "preset": config.preset,
        "metric": config.metric,
        "best_model": best.model,
        "best_family": best.family,
        "test_auc": round(perf["auc"], 6),
        "test_accuracy": round(perf["accuracy"], 6),
        "train_seconds": round(train_seconds, 2),
    }
    model_dir = Path(model_dir)
    model.save(
        model_dir,
        model_name=best.model,
        hyperparameters=best.params,
        config=asdict(config),
        metrics={k: perf[k] for k in ("rows", "accuracy", "auc", "auprc")},
        train_seconds=round(train_seconds, 3),
    )
    _check_round_trip(model_dir, test_columns, prob)
    reports.write_leaderboard(model_dir / "leaderboard.csv", entries)
    reports.write_fit_summary(model_dir / "fit_summary.txt", summary, entries)
    title = f"{best.model} on {Path(data).name}"
    reports.write_performance(model_dir / "model_performance.txt", perf, classes, title)
    reports.write_test_predictions(
        model_dir / "test_prediction.csv", table.rows[test_rows], y_test, prob, classes
    )
    if test_ok.all():
        reports.plot_eval(model_dir / "eval.png", y_test, prob, classes, title)
    else:
        reports.plot_eval(model_dir / "eval.png", y_test[test_ok], prob[test_ok], classes, title)
    return summary


def _fit_candidates(cands, x_train, y_train, x_test, y_test, test_ok, config):
    automl = config.preset == "automl"
    steps = len(cands) * ((config.folds if automl else 0) + 1)
    entries: list[reports.Entry] = []
    fitted: dict[str, Predictor] = {}
    with progress_bar(
        total=steps, desc="train-tabular", unit="fit", disable=not config.progress
    ) as bar:
        for order, (name, (family, params)) in enumerate(cands.items()):
            entry = reports.Entry(name, family, dict(params), order)
            if automl:
                entry.fold_scores = cross_validate(family, params, x_train, y_train, config, bar)
                entry.score_val = float(np.mean(entry.fold_scores))
                entry.score_val_std = float(np.std(entry.fold_scores))
            t0 = time.perf_counter()
            fitted[name] = fit(family, params, x_train, y_train, config.seed, config.threads)
            entry.fit_time = time.perf_counter() - t0
            bar.update(1)
            t0 = time.perf_counter()
            prob = fitted[name].predict(x_test[test_ok])
            entry.pred_time_test = time.perf_counter() - t0
            entry.score_test = reports.score(config.metric, y_test[test_ok], prob)
            entry.auc_test = reports.score("auc", y_test[test_ok], prob)
            entry.accuracy_test = reports.score("accuracy", y_test[test_ok], prob)
            log.info(
                "%s: val %s test %.4f (%.1fs)",
                name,
                entry.score_val,
                entry.score_test,
                entry.fit_time,
            )
            entries.append(entry)
    return entries, fitted


def _check_round_trip(model_dir: Path, columns: list[np.ndarray], expected: np.ndarray) -> None:
    loaded = load_model(model_dir)
    again = loaded.predict_columns(columns)
    if not np.allclose(again, expected, rtol=0, atol=1e-6, equal_nan=True):
        raise DataError(f"{model_dir}: the saved model does not reproduce its test predictions")


# ---------------------------------------------------------------- CLI


def _parse_hp(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs; values parsed as JSON when they can be (SageMaker's rule)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"--hp {item!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="CSV or .csv.gz (delimiter , ; tab or | is sniffed)")
    p.add_argument("--model-dir", type=Path, required=True, help="output model directory")
    p.add_argument(
        "--target",
        help="label column name (CSV has a header); omit for a headerless "
        "CSV with the label in the first column",
    )
    p.add_argument("--preset", choices=("xgboost", "automl"), default="xgboost")
    p.add_argument(
        "--positive",
        help="positive class label (default: 1/yes/true, else the second in sort order)",
    )
    p.add_argument("--drop", default="", help="comma-separated columns to ignore")
    p.add_argument("--metric", choices=reports.METRICS, default="auc", help="AutoML pick metric")
    p.add_argument("--folds", type=int, default=5, help="AutoML cross-validation folds")
    p.add_argument("--families", default=",".join(FAMILIES), help="AutoML families to try")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rows", type=int, help="use a shuffled slice of this many rows")
    p.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset hyperparameter (repeatable), e.g. --hp num_round=200",
    )
    p.add_argument("--threads", type=int, default=0, help="training threads (0: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train_tabular_command(args: argparse.Namespace) -> int:
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise DataError(f"--families: unknown {', '.join(bad)}; use {', '.join(FAMILIES)}")
    if args.folds < 2:
        raise DataError("--folds must be at least 2")
    config = TabularConfig(
        preset=args.preset,
        target=args.target,
        positive=args.positive,
        drop=tuple(d.strip() for d in args.drop.split(",") if d.strip()),
        test_fraction=args.test_fraction,
        seed=args.seed,
        folds=args.folds,
        metric=args.metric,
        families=families,
        hyperparameters=_parse_hp(args.hp),
        max_rows=args.max_rows,
        threads=args.threads,
        progress=not args.no_progress,
    )
    summary = train_tabular(args.data, args.model_dir, config)
    print(
        f"{summary['best_model']}: test AUC {summary['test_auc']:.4f}, accuracy "
        f"{summary['test_accuracy']:.4f}, {summary['train_seconds']:.1f}s -> {args.model_dir}"
    )
    print((Path(args.model_dir) / "leaderboard.csv").read_text().rstrip())
    return 0
