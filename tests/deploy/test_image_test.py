"""scripts/image-test.sh's set-up step, run for real on a PATH of our making (no images built)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/image-test.sh"


def _path_without_podman(bin_dir: Path) -> str:
    """A PATH with what the set-up step needs before it installs anything, runc and mmdebstrap
    as stubs, `id` saying a user who is not root (so nothing gets installed) and no podman."""
    bin_dir.mkdir()
    for tool in ("dirname", "mkdir", "mktemp", "rm", "python3"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not on PATH")
        (bin_dir / tool).symlink_to(found)
    for stub, body in (("runc", "exit 0"), ("mmdebstrap", "exit 0"), ("id", "echo 1000")):
        (bin_dir / stub).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / stub).chmod(0o755)
    return str(bin_dir)


def test_setup_finds_podman_missing_although_the_script_wraps_it(tmp_path: Path) -> None:
    # The script defines a podman() function; `command -v podman` found that, so a machine
    # without podman never had it installed and stopped at "podman: command not found".
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    env = {
        "PATH": _path_without_podman(tmp_path / "bin"),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "RECSQL_IMAGE_TEST_HOME": str(tmp_path / "home"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    out = subprocess.run(
        [bash, str(SCRIPT), "setup"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1, out.stderr
    missing = [ln for ln in out.stderr.splitlines() if ln.startswith("image-test: missing ")]
    assert missing, out.stderr
    assert "podman" in missing[0].split(":")[1].split(), missing[0]
    assert "image-test: 0 passed, 1 failed" in out.stdout
