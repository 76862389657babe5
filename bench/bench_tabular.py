"""Tabular models: bank-full figures (XGBoost preset vs AutoML) and in-process scoring speed.

    python bench/bench_tabular.py [--quick] [--skip-train]

Trains on tests/data/bank-full.csv.gz (45,211 rows, 70/30 split, seed 0) and
prints test AUC, accuracy and training time for the preset and the AutoML
pick; then times `TabularModel.predict_columns` (raw string columns in, one
thread) on the preset model (100 trees, depth 5) at several batch sizes,
and the server's whole text/csv path (CsvTable decoding of a header-less
body + predict_columns), against the booster alone on a pre-encoded float32
matrix (the baseline: what plain XGBoost with one thread reaches). Medians of
several runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import load_model  # noqa: E402
from serve.records import CsvTable  # noqa: E402
from training.tabular import TabularConfig, read_table, train_tabular  # noqa: E402

BANK = ROOT / "tests" / "data" / "bank-full.csv.gz"


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_figures(out: Path, quick: bool) -> list[str]:
    lines = [
        "| run | best model | test AUC | test accuracy | train seconds |",
        "|---|---|---|---|---|",
    ]
    runs = [("XGBoost preset", TabularConfig(target="y", progress=False))]
    if not quick:
        runs.append(
            ("AutoML (5-fold CV)", TabularConfig(target="y", preset="automl", progress=False))
        )
    for i, (name, config) in enumerate(runs):
        summary = train_tabular(BANK, out / f"run{i}", config)
        lines.append(
            f"| {name} | {summary['best_model']} | {summary['test_auc']:.4f} |"
            f" {summary['test_accuracy']:.4f} | {summary['train_seconds']:.1f} |"
        )
    return lines


def request_columns(columns: list[np.ndarray], rows: int) -> list[np.ndarray]:
    """Fresh strings made row by row, as the server's CSV decoder makes them (the file's
    strings were made long ago and lie scattered in memory: slower to read than a request's)."""
    out = [np.empty(rows, dtype=object) for _ in columns]
    for r in range(rows):
        for out_col, col in zip(out, columns, strict=True):
            out_col[r] = (col[r] + "\0")[:-1]  # a new str object, not the table's
    return out


def csv_body(columns: list[np.ndarray], rows: int) -> bytes:
    """A header-less request body, as Aurora or a SQL UDF sends it."""
    return "".join(",".join(str(c[r]) for c in columns) + "\n" for r in range(rows)).encode()


def serve_csv(model, body: bytes) -> np.ndarray:
    """What the server does with a text/csv body: decode into columns, then predict."""
    columns, ok = CsvTable(body).values(model.feature_names)
    scores = model.predict_columns(columns)
    scores[~ok] = np.nan
    return scores


def speed_figures(model_dir: Path, quick: bool) -> list[str]:
    model = load_model(model_dir)
    table = read_table(BANK, "y")
    booster = model.predictor.booster
    lines = [
        "| batch rows | predict_columns rows/s | CSV body -> predict rows/s"
        " | booster alone rows/s | ms per batch |",
        "|---|---|---|---|---|",
    ]
    for batch in (1, 100, 1000, 10_000) if not quick else (1, 1000):
        cols = request_columns(table.columns, batch)
        matrix, _ = model.encoder.encode(cols)
        repeats = max(5, min(2000, 200_000 // batch)) // (4 if quick else 1)
        model.predict_columns(cols)  # warm up
        body = csv_body(table.columns, batch)
        full = median_seconds(lambda cols=cols: model.predict_columns(cols), repeats)
        served = median_seconds(lambda b=body: serve_csv(model, b), repeats)
        bare = median_seconds(lambda m=matrix: booster.inplace_predict(m), repeats)
        lines.append(
            f"| {batch:,} | {batch / full:,.0f} | {batch / served:,.0f} | {batch / bare:,.0f}"
            f" | {full * 1e3:.3f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="preset only, fewer repeats")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        train = train_figures(out, args.quick)
        speed = speed_figures(out / "run0", args.quick)
    print("## Tabular models (bank-full)\n")
    print("Test split: 30% of 45,211 rows (seed 0). Single runs: training times are noisy.\n")
    print("\n".join(train) + "\n")
    print("In-process scoring, XGBoost preset (100 trees, depth 5), one thread; medians:\n")
    print("\n".join(speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
