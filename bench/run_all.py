"""`make bench`: run every benchmark in turn and write bench/RESULTS.md.

Each bench/bench_*.py prints a markdown section (figures, medians of several
runs, and the same-run baseline it compares against). This script runs them
one at a time (the machines are noisy: never two at once), echoes their output,
and writes it, with the machine it ran on, to bench/RESULTS.md.

    python bench/run_all.py [--only serve,train] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "quality",
    "prep",
    "train",
    "serve",
    "logs",
    "history",
    "similar",
    "events",
    "ab",
    "udf",
    "db",
    "tabular",
]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(ORDER))
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    names = [n for n in ORDER if not args.only or n in args.only.split(",")]
    sections = [
        "# recsql benchmark results\n",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"machine: {machine()}.\n",
    ]
    failed = []
    for name in names:
        script = HERE / f"bench_{name}.py"
        if not script.exists():
            continue
        quick = args.quick and "--quick" in script.read_text()
        cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
        print(f"== {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        print(proc.stdout, flush=True)
        sections.append(proc.stdout.strip() + "\n")
        if proc.returncode != 0:
            failed.append(name)
            sections.append(f"_bench_{name}.py exited with {proc.returncode}_\n")
    args.out.write_text("\n".join(sections))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
