"""What a tabular training run leaves beside the model, as AutoGluon pipeline users know it.

leaderboard.csv        one row per candidate: CV score, test score, fit/predict times
fit_summary.txt        the run: data, split, candidates, the winner and its settings
model_performance.txt  accuracy, precision/recall per class, AUC, AUPRC, and the
                       bank-marketing-style confusion report
test_prediction.csv    held-out rows: label, predicted label, P(positive)
eval.png               ROC, precision-recall and the confusion matrix
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LEADERBOARD_COLUMNS = (
    "model",
    "family",
    "score_val",
    "score_val_std",
    "score_test",
    "auc_test",
    "accuracy_test",
    "fit_time",
    "pred_time_test",
    "fit_order",
)


@dataclass
class Entry:
    """One leaderboard row (a trained candidate)."""

    model: str
    family: str
    params: dict[str, Any]
    fit_order: int
    score_val: float | None = None
    score_val_std: float | None = None
    score_test: float | None = None
    auc_test: float | None = None
    accuracy_test: float | None = None
    fit_time: float = 0.0
    pred_time_test: float = 0.0
    fold_scores: list[float] = field(default_factory=list)


def _skm():  # sklearn is imported when a run needs it, not by `recsql --help`
    from sklearn import metrics

    return metrics


def score(metric: str, y: np.ndarray, prob: np.ndarray) -> float:
    """Higher is better for every metric (logloss is reported negated, as AutoGluon does)."""
    skm = _skm()
    if metric == "auc":
        return float(skm.roc_auc_score(y, prob))
    if metric == "aupr":
        return float(skm.average_precision_score(y, prob))
    if metric == "accuracy":
        return float(skm.accuracy_score(y, prob >= 0.5))
    if metric == "logloss":
        return -float(skm.log_loss(y, np.clip(prob, 1e-15, 1 - 1e-15), labels=[0, 1]))
    raise ValueError(f"unknown metric {metric!r}")


METRICS = ("auc", "aupr", "accuracy", "logloss")


def performance(y: np.ndarray, prob: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    skm = _skm()
    pred = (prob >= 0.5).astype(int)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=[0, 1], zero_division=0
    )
    per_class = {
        classes[k]: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
        for k in (0, 1)
    }
    both = len(np.unique(y)) == 2
    return {
        "rows": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "auc": float(skm.roc_auc_score(y, prob)) if both else float("nan"),
        "auprc": float(skm.average_precision_score(y, prob)) if both else float("nan"),
        "per_class": per_class,
        "confusion": skm.confusion_matrix(y, pred, labels=[0, 1]).tolist(),
    }


def confusion_report(confusion: list[list[int]], classes: Sequence[str]) -> str:
    """The seed notebook's table: per predicted class, the share of each observed class."""
    cm = np.asarray(confusion)
    total = cm.sum()
    lines = [f"Overall Classification Rate: {100 * np.trace(cm) / max(total, 1):.1f}%", ""]
    width = max(12, *(len(c) + 2 for c in classes))
    lines.append("Predicted".ljust(width) + "".join(c.rjust(width + 4) for c in classes))
    lines.append("Observed")
    col_totals = cm.sum(axis=0)
    for i, name in enumerate(classes):
        cells = []
        for j in range(2):
            share = 100 * cm[i, j] / col_totals[j] if col_totals[j] else 0.0
            cells.append(f"{share:.0f}% ({cm[i, j]})".rjust(width + 4))
        lines.append(name.ljust(width) + "".join(cells))
    lines.append("")
    for i, name in enumerate(classes):
        row = cm[i].sum()
        rate = 100 * cm[i, i] / row if row else 0.0
        lines.append(f"{name}: {rate:.1f}% of {row} observed rows classified correctly")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.6g}"


def write_leaderboard(path: Path, entries: Sequence[Entry]) -> None:
    ranked = sorted(entries, key=lambda e: -(e.score_val if e.score_val is not None else -np.inf))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LEADERBOARD_COLUMNS)
        for e in ranked:
            writer.writerow(
                [e.model, e.family, _fmt(e.score_val), _fmt(e.score_val_std), _fmt(e.score_test)]
                + [_fmt(e.auc_test), _fmt(e.accuracy_test), f"{e.fit_time:.3f}"]
                + [f"{e.pred_time_test:.4f}", e.fit_order]
            )


def write_performance(path: Path, perf: dict[str, Any], classes: Sequence[str], title: str) -> None:
    lines = [
        f"Evaluation of {title} on {perf['rows']} held-out rows (threshold 0.5)",
        "",
        f"accuracy: {perf['accuracy']:.4f}",
        f"AUC:      {perf['auc']:.4f}",
        f"AUPRC:    {perf['auprc']:.4f}",
        "",
        f"{'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for name, s in perf["per_class"].items():
        lines.append(
            f"{name:<16}{s['precision']:>10.4f}{s['recall']:>10.4f}{s['f1']:>10.4f}{s['support']:>10}"
        )
    lines += ["", confusion_report(perf["confusion"], classes), ""]
    Path(path).write_text("\n".join(lines))


def write_fit_summary(path: Path, summary: dict[str, Any], entries: Sequence[Entry]) -> None:
    lines = ["*** Summary of fit() ***"]
    for key, value in summary.items():
        lines.append(f"{key}: {value}")
    lines += ["", "Candidates (fit order):"]
    for e in sorted(entries, key=lambda e: e.fit_order):
        if e.fold_scores:
            folds = ", ".join(f"{s:.4f}" for s in e.fold_scores)
            val = f"score_val={_fmt(e.score_val)} (+/- {_fmt(e.score_val_std)}) folds=[{folds}]"
        else:
            val = "score_val=n/a (fitted once, no cross-validation)"
        lines.append(
            f"  {e.model} [{e.family}] {val} score_test={_fmt(e.score_test)}"
            f" fit_time={e.fit_time:.2f}s"
        )
        lines.append(f"      hyperparameters: {e.params}")
    Path(path).write_text("\n".join(lines) + "\n")


def write_test_predictions(
    path: Path, rows: np.ndarray, y: np.ndarray, prob: np.ndarray, classes: Sequence[str]
) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "label", "predicted_label", f"probability_{classes[1]}"])
        for r, t, p in zip(rows.tolist(), y.tolist(), prob.tolist(), strict=True):
            writer.writerow([r, classes[t], classes[int(p >= 0.5)], f"{p:.6f}"])


def plot_eval(
    path: Path, y: np.ndarray, prob: np.ndarray, classes: Sequence[str], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skm = _skm()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    fpr, tpr, _ = skm.roc_curve(y, prob)
    axes[0].plot(fpr, tpr, label=f"AUC = {skm.auc(fpr, tpr):.4f}")
    axes[0].plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    precision, recall, _ = skm.precision_recall_curve(y, prob)
    ap = skm.average_precision_score(y, prob)
    axes[1].plot(recall, precision, label=f"AUPRC = {ap:.4f}")
    axes[1].axhline(y.mean(), linestyle="--", color="grey", linewidth=0.8)
    axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall")
    for ax in axes[:2]:
        ax.legend(loc="lower right" if ax is axes[0] else "upper right")
        ax.grid(alpha=0.3)
    cm = skm.confusion_matrix(y, prob >= 0.5, labels=[0, 1])
    axes[2].imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            color = "white" if cm[i, j] > cm.max() / 2 else "black"
            axes[2].text(j, i, str(cm[i, j]), ha="center", va="center", color=color)
    axes[2].set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="observed",
        title="Confusion matrix (threshold 0.5)",
    )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
