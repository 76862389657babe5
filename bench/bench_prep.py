"""Event preparation at scale: time and peak RSS of `prepare`, and the synth writer's speed.

    .venv/bin/python bench/bench_prep.py                      # 2M rows
    .venv/bin/python bench/bench_prep.py 2000000 20000000 110000000 --workdir /tmp

For each size: write a synthetic REES46-shaped CSV (timed: rows/s), then prepare it in a
fresh subprocess restricted to `--threads` DuckDB threads (2 emulates the 2-core target) and
report that subprocess's own peak RSS (ru_maxrss), which covers DuckDB's native memory too.
Prints one markdown table row per size. The CSV (~130 bytes a row: 110M rows ~ 14 GB) is
deleted afterwards unless --keep. Target: 110M events in <= 10 min and <= 8 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from training.events import prepare_events
started = time.perf_counter()
prepared = prepare_events([Path(sys.argv[2])], progress=False, threads=int(sys.argv[4]),
                          memory_limit=sys.argv[5] or None, temp_dir=Path(sys.argv[3]))
prepare_s = time.perf_counter() - started
started = time.perf_counter()
prepared.save(Path(sys.argv[3]) / "prepared")
save_s = time.perf_counter() - started
stats = {k: v for k, v in prepared.stats.items() if k != "files"}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
print(json.dumps({"prepare_s": prepare_s, "save_s": save_s, "peak_rss": peak, **stats}))
"""


def bench_size(rows: int, workdir: Path, threads: int, memory_limit: str, keep: bool) -> str:
    from training.synth import SynthConfig, write_synthetic

    work = Path(tempfile.mkdtemp(prefix=f"bench-prep-{rows}-", dir=workdir))
    try:
        csv = work / "events.csv"
        synth = write_synthetic(csv, SynthConfig(rows=rows, seed=0), progress=rows >= 10_000_000)
        size_gb = csv.stat().st_size / 1e9
        cmd = [sys.executable, "-c", _CHILD, str(ROOT), str(csv), str(work), str(threads)]
        done = subprocess.run(cmd + [memory_limit], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"prepare failed at {rows:,} rows:\n{done.stderr.strip()[-2000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        return (
            f"| {rows:,} | {size_gb:.2f} | {synth['rows_per_second'] / 1e6:.2f} | "
            f"{r['prepare_s']:.1f} | {r['save_s']:.1f} | {r['peak_rss'] / 2**30:.2f} | "
            f"{r['users']:,} | {r['products']:,} | {r['train_rows']:,} |"
        )
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[2_000_000], help="rows per run")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads (default 2)")
    parser.add_argument("--memory-limit", default="", help="DuckDB memory_limit (default: ours)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)
    limit = args.memory_limit or "default"
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"threads={args.threads} memory_limit={limit} started {started}")
    print()
    print(
        "| events | CSV GB | synth M rows/s | prepare s | save s | peak RSS GiB | users | "
        "products | train rows |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in args.sizes:
        print(
            bench_size(rows, args.workdir, args.threads, args.memory_limit, args.keep), flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
