"""Bad input at scale: generated requests from /openapi.json against a real server.

    python bench/fuzz_http.py [--requests 10000] [--seed 0] [--workers 2]

Starts `python -m serve` (2 gevent workers, a random MFBlock startup model, the
/models API over a root holding one more model), sends hypothesis-generated
requests built from the server's OpenAPI document (tests/fault/fuzz.py: every
path and method, random bytes / JSON / CSV-ish / .npy bodies, random
Content-Type, Accept, custom attributes, target model, chunked bodies) over
one keep-alive connection, and prints a markdown section: responses by
status class, responses >= 500 (target 0), workers before/after (target:
the same pids). Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fault.fuzz import run_fuzz  # noqa: E402
from tests.fault.loadgen import children, wait_for_workers  # noqa: E402
from tests.serve.conftest import Server, make_artifact  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recsql-fuzz-") as tmp_name:
        tmp = Path(tmp_name)
        model = make_artifact(tmp / "model")
        make_artifact(tmp / "root" / "fz" / "model", seed=5)
        server = Server(
            [
                "--model-dir",
                str(model),
                "--workers",
                str(args.workers),
                "--model-root",
                str(tmp / "root"),
            ],
            {"SAGEMAKER_MULTI_MODEL": "true"},
            tmp / "server.log",
        )
        try:
            server.wait_listening()
            before = wait_for_workers(server.proc.pid, args.workers)
            start = time.monotonic()
            report = run_fuzz(server.url, args.requests, args.seed)
            seconds = time.monotonic() - start
            after = children(server.proc.pid)
            alive = server.proc.poll() is None
        finally:
            server.stop()
    bad = report.at_least_500()
    lines = [
        "## HTTP fuzzing (generated from /openapi.json)",
        "",
        f"{report.sent} requests in {seconds:.0f} s (seed {args.seed}, {args.workers} workers).",
        "",
        "| status class | responses |",
        "|---|---:|",
        *(f"| {name} | {count} |" for name, count in report.classes().items()),
        "",
        f"- responses >= 500: **{bad}** (target 0)",
        f"- connection errors: {len(report.connection_errors)}",
        f"- workers before {sorted(before)}, after {sorted(after)}: "
        f"{'same' if sorted(before) == sorted(after) else 'CHANGED'}; master alive: {alive}",
        f"- requests per path: {dict(sorted(report.by_operation.items()))}",
    ]
    print("\n".join(lines))
    for line in report.server_errors[:5] + report.connection_errors[:5]:
        print(f"    {line}", file=sys.stderr)
    ok = bad == 0 and not report.connection_errors and sorted(before) == sorted(after) and alive
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
