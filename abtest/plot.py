"""The report's picture: the primary metric per variant per hour or day, with its band."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from scipy.stats import norm

from model.errors import DataError

if TYPE_CHECKING:
    from abtest.report import Report


def plot_report(report: Report, path: Path) -> None:
    """A PNG: one line per variant, a (1 - alpha) band from each period's own users."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    from abtest.report import METRICS

    z = float(norm.ppf(1 - report.alpha / 2))
    share = METRICS[report.metric][1] is not None
    scale = 100.0 if share else 1.0
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    try:
        for variant, points in sorted(report.series.items()):
            when = [datetime.fromisoformat(p) for p, _ in points]
            value = [e.value * scale for _, e in points]
            spread = [z * e.se * scale if math.isfinite(e.se) else 0.0 for _, e in points]
            (line,) = ax.plot(when, value, marker="o", markersize=3, label=variant)
            ax.fill_between(
                when,
                [v - s for v, s in zip(value, spread, strict=True)],
                [v + s for v, s in zip(value, spread, strict=True)],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
        label = METRICS[report.metric][2]
        ax.set_ylabel(label + (" (%)" if share else ""))
        ax.set_title(
            f"{label} by variant ({(1 - report.alpha) * 100:g}% band), "
            f"window {report.window_s / 3600:g}h",
            fontsize=10,
        )
        ax.legend(title="variant")
        ax.grid(alpha=0.3)
        fig.autofmt_xdate()
        try:
            fig.savefig(path, dpi=100)
        except OSError as exc:
            raise DataError(f"{path}: cannot write the plot ({exc})") from exc
    finally:
        plt.close(fig)
