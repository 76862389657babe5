"""Prometheus metrics, summed across gunicorn workers.

Each worker counts in memory and a background thread (a greenlet under
gevent) writes its totals to `worker-<pid>.json` in the state folder once a
second when they changed; the worker answering /metrics writes its own first;
/metrics adds up every worker's file. Files of workers that have exited stay,
so counters never go backwards when a worker is replaced. Other workers'
figures can thus be up to a second old.

Every series is labelled with the model and the production variant that answered
(`variant="AllTraffic"` for a plain --model-dir; a shadow variant's own name), so
an A/B test reads its request, row and latency figures per variant.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

from model.variants import DEFAULT_VARIANT

log = logging.getLogger(__name__)

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HELP = {
    "recsql_requests_total": ("counter", "Invocation requests by model, variant and status."),
    "recsql_rows_total": ("counter", "Input records scored."),
    "recsql_null_rows_total": ("counter", "Records answered with no score (empty/null)."),
    "recsql_errors_total": ("counter", "Invocation requests answered with a 4xx or 5xx."),
    "recsql_request_duration_seconds": ("histogram", "Invocation latency in the server."),
}


class Metrics:
    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self._lock = threading.Lock()
        self._counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._hist: dict[str, list[float]] = {}  # model+variant labels -> buckets + [sum, count]
        self._flush_lock = threading.Lock()
        self._dirty = False
        self._pid = -1  # no flusher yet: started by the first request in each process

    def _own(self) -> None:
        """After a fork, count this worker's requests only, in its own file."""
        if os.getpid() == self._pid:
            return
        self._pid = os.getpid()
        self._counters.clear()
        self._hist.clear()
        if self.folder is not None:
            threading.Thread(target=self._flush_every_second, daemon=True).start()

    def _flush_every_second(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(1.0)
            if self._dirty:
                self.flush()

    def observe(
        self,
        model: str,
        status: int,
        rows: int,
        null_rows: int,
        seconds: float,
        variant: str = DEFAULT_VARIANT,
    ) -> None:
        self._own()
        m = f'model="{_label(model)}",variant="{_label(variant)}"'
        with self._lock:
            self._counters["recsql_requests_total"][f'{m},status="{status}"'] += 1
            self._counters["recsql_rows_total"][m] += rows
            self._counters["recsql_null_rows_total"][m] += null_rows
            if status >= 400:
                self._counters["recsql_errors_total"][f'{m},status="{status}"'] += 1
            hist = self._hist.setdefault(m, [0.0] * (len(BUCKETS) + 2))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += seconds
            hist[-1] += 1
            self._dirty = True

    def _snapshot(self) -> dict:
        with self._lock:
            return {
                "counters": {k: dict(v) for k, v in self._counters.items()},
                "hist": {k: list(v) for k, v in self._hist.items()},
            }

    def flush(self) -> None:
        if self.folder is None:
            return
        self._own()
        self._dirty = False
        path = self.folder / f"worker-{self._pid}.json"
        try:
            with self._flush_lock:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._snapshot()))
                os.replace(tmp, path)
        except OSError:
            log.warning("cannot write metrics to %s", path, exc_info=True)

    def render(self) -> str:
        """All workers' metrics in the Prometheus text format."""
        snapshots = [self._snapshot()]
        if self.folder is not None:
            self.flush()
            snapshots = []
            for path in sorted(self.folder.glob("worker-*.json")):
                try:
                    snapshots.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    continue
        counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        hist: dict[str, list[float]] = {}
        for snap in snapshots:
            for name, series in snap["counters"].items():
                for labels, value in series.items():
                    counters[name][labels] += value
            for model, values in snap["hist"].items():
                total = hist.setdefault(model, [0.0] * len(values))
                for i, v in enumerate(values):
                    total[i] += v
        lines = []
        for name, (kind, text) in _HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "counter":
                lines += [f"{name}{{{lab}}} {_num(v)}" for lab, v in sorted(counters[name].items())]
                continue
            for labels, values in sorted(hist.items()):
                for bound, count in zip(BUCKETS, values, strict=False):
                    lines.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {_num(count)}')
                lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {_num(values[-1])}')
                lines.append(f"{name}_sum{{{labels}}} {values[-2]:.6f}")
                lines.append(f"{name}_count{{{labels}}} {_num(values[-1])}")
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
