"""`recsql demo`, the main job, end to end as a user runs it (small data)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _demo(tmp_path: Path, env: dict[str, str], flags: tuple[str, ...] | list[str] = ()) -> str:
    cmd = [
        sys.executable,
        "-m",
        "recsql_cli",
        "demo",
        "--rows",
        "40000",
        "--workdir",
        str(tmp_path / "demo"),
        *flags,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _check_output(out: str, engine: str) -> None:
    steps = re.findall(r"^\[(\d)/6\]", out, flags=re.M)
    assert steps == [str(i) for i in range(1, 7)]
    assert f"load the events into {engine}" in out
    assert "server stopped (exit 0)" in out
    # the candidate query printed a table of scored rows (scores are numbers, not NULL)
    candidates = out.split("Score a user's candidate products", 1)[1].split("rows)", 1)[0]
    scores = re.findall(r"\s(-?\d+\.\d{4})\s*$", candidates, flags=re.M)
    assert len(scores) >= 3
    assert [float(s) for s in scores] == sorted((float(s) for s in scores), reverse=True)


@pytest.mark.slow
def test_demo_on_duckdb(tmp_path: Path) -> None:
    out = _demo(tmp_path, {"RECSQL_MYSQL_URL": ""})
    _check_output(out, "duckdb")
    assert "recsql score: scored" in out and (tmp_path / "demo" / "model" / "recsql.json").exists()


@pytest.mark.slow
@pytest.mark.mysql
@pytest.mark.parametrize("path", ["in-server", "http"])
def test_demo_on_mariadb(tmp_path: Path, mysql_url: str, fresh_database: str, path: str) -> None:
    url = mysql_url.rsplit("/", 1)[0] + "/" + fresh_database
    # the server's user must read the vectors file: a work directory it can reach
    # (pytest's tmp_path sits under a 0700 directory)
    work = Path(tempfile.mkdtemp(prefix="recsql-demo-"))
    work.chmod(0o755)
    try:
        out = _demo(work, {"RECSQL_MYSQL_URL": url}, ["--http"] if path == "http" else [])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _check_output(out, "mysql")
    assert f"created {fresh_database}.will_purchase" in out
    if path == "http":
        assert "will_purchase scores over HTTP" in out and "in-server model" not in out
    else:
        assert "will_purchase scores inside the server" in out
        assert f"in-server model {work / 'demo' / 'model.vectors'}" in out
