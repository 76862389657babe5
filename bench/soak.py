"""Soak: steady mixed load against a real server; errors and memory growth.

    python bench/soak.py [--minutes 10] [--workers 2] [--threads 4]
    python bench/soak.py --minutes 1          # smoke run

Starts `python -m serve` (gevent workers, a random MFBlock model), warms it
up, then runs keep-alive clients (tests/fault/loadgen.py) for the given
minutes with a rotating mix: single-pair CSV, 200-pair CSV with bad and
unknown rows, JSON pairs, JSON lines, top-K JSON, and malformed JSON (which
must get its 400). Every reply is compared with the reply taken before the
run. The RSS (VmRSS) of the master and the workers is read from /proc after
the warm-up, every 30 s and at the end. Prints a markdown section. Targets:
0 errors, total RSS growth < 5%, the same worker pids. Exits 1 when missed.
Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fault.loadgen import LoadRun, Request, tree_rss_kb, wait_for_workers  # noqa: E402
from tests.serve.conftest import PRODUCT_IDS, USER_IDS, Server, make_artifact  # noqa: E402

SAMPLE_SECONDS = 30


def request_mix() -> list[tuple[str, bytes, dict[str, str], int]]:
    """(kind, body, headers, expected status)."""
    u, p = [int(x) for x in USER_IDS], [int(x) for x in PRODUCT_IDS]
    batch = "".join(f"{u[i % len(u)]},{p[(7 * i) % len(p)]}\n" for i in range(190))
    bad_rows = "1,2\nx,y\n\n-5,\n" + f"{u[0]}\n{u[1]},{p[1]},9\n" + '"a",1\n' * 4
    csv = {"Content-Type": "text/csv"}
    js = {"Content-Type": "application/json", "Accept": "application/json"}
    return [
        ("csv-1", f"{u[1]},{p[2]}\n".encode(), csv, 200),
        ("csv-200", (batch + bad_rows).encode(), csv, 200),
        ("json", json.dumps({"user_id": u[:50], "product_id": p[:50]}).encode(), js, 200),
        (
            "jsonlines",
            "".join(f"[{a},{b}]\n" for a, b in zip(u[:30], p[:30], strict=True)).encode(),
            {"Content-Type": "application/jsonlines"},
            200,
        ),
        ("top-k", json.dumps({"user_id": u[:5] + [1], "top_k": 10}).encode(), js, 200),
        ("bad-json", b'{"user_id": [1, 2', js, 400),
    ]


def build_requests(url: str) -> list[Request]:
    out = []
    for kind, body, headers, status in request_mix():
        want = requests.post(url + "/invocations", body, headers=headers, timeout=30)
        if want.status_code != status:
            raise SystemExit(f"{kind}: expected {status}, got {want.status_code}: {want.text}")
        check = _same(status, want.content if status == 200 else None)
        out.append(Request("/invocations", body, headers, check=check, kind=kind))
    return out


def _same(status: int, content: bytes | None):
    return lambda got, body: got == status and (content is None or body == content)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default 10%%)")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, args.minutes * 6)
    with tempfile.TemporaryDirectory(prefix="recsql-soak-") as tmp_name:
        tmp = Path(tmp_name)
        server = Server(
            ["--model-dir", str(make_artifact(tmp / "model")), "--workers", str(args.workers)],
            {"RECSQL_LOG_LEVEL": "WARNING"},  # one INFO line per request would fill the disk
            tmp / "server.log",
        )
        try:
            server.wait_listening()
            master = server.proc.pid
            workers = wait_for_workers(master, args.workers)
            mix = build_requests(server.url)
            with LoadRun(server.url, mix, threads=args.threads, seconds=warmup) as run:
                warm = run.join(warmup + 60)
            start_rss = tree_rss_kb(master)
            samples = [(0.0, sum(start_rss.values()))]
            seconds = args.minutes * 60
            with LoadRun(server.url, mix, threads=args.threads, seconds=seconds) as run:
                began = time.monotonic()
                while (elapsed := time.monotonic() - began) < seconds:
                    time.sleep(min(SAMPLE_SECONDS, seconds - elapsed))
                    samples.append((time.monotonic() - began, sum(tree_rss_kb(master).values())))
                result = run.join(seconds + 120)
            end_rss = tree_rss_kb(master)
            same_workers = sorted(workers) == sorted(p for p in end_rss if p != master)
        finally:
            server.stop()
    start_kb, end_kb = sum(start_rss.values()), sum(end_rss.values())
    growth = (end_kb - start_kb) / start_kb * 100
    errors = len(result.failures) + len(warm.failures)
    print(
        report(
            args, warmup, warm, result, start_rss, end_rss, growth, samples, same_workers, master
        )
    )
    return 0 if errors == 0 and growth < 5 and same_workers else 1


def report(
    args, warmup, warm, result, start_rss, end_rss, growth, samples, same_workers, master
) -> str:
    def mb(kb: int) -> str:
        return f"{kb / 1024:.1f}"

    pids = [master, *sorted((set(start_rss) | set(end_rss)) - {master})]
    rows = [
        f"| {pid}{' (master)' if pid == master else ''} | {mb(start_rss.get(pid, 0))} "
        f"| {mb(end_rss.get(pid, 0))} |"
        for pid in pids
    ]
    peak = max(kb for _, kb in samples + [(0, sum(end_rss.values()))])
    return "\n".join(
        [
            f"## Soak: {args.minutes:g} min, {args.workers} workers, "
            f"{args.threads} keep-alive clients",
            "",
            f"- warm-up {warmup:.0f} s: {warm.summary()}",
            f"- soak: {result.summary()}",
            f"- requests by kind: {dict(sorted(result.by_kind.items()))}",
            f"- errors: **{len(result.failures) + len(warm.failures)}** (target 0)",
            f"- RSS master + workers: {mb(sum(start_rss.values()))} MB after warm-up -> "
            f"{mb(sum(end_rss.values()))} MB at the end: **{growth:+.2f}%** (target < 5%); "
            f"peak {mb(peak)} MB",
            f"- same worker pids at start and end: {same_workers}",
            "",
            "| pid | RSS start MB | RSS end MB |",
            "|---|---:|---:|",
            *rows,
            "",
            "RSS every ~30 s (MB): " + ", ".join(mb(kb) for _, kb in samples),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
