"""The Dockerfile, checked by reading it (no Docker engine on the test machines)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.dockerfile import ROOT, parse

PREAMBLE, STAGES = parse()
BY_NAME = {s.name: s for s in STAGES}


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} not installed (pip install '.[test]' brings it)")
    return found


def test_stages_and_default_target() -> None:
    assert [s.name for s in STAGES] == [
        "udf-build",
        "mariadb",
        "cpu-base",
        "gpu-base",
        "app",
        "local",
        "sagemaker",
    ]
    # `docker build .` builds the last stage: the SageMaker image, from `app`.
    assert STAGES[-1].name == "sagemaker" and STAGES[-1].base == "app"
    assert BY_NAME["local"].base == "app"
    # CPU by default; VARIANT=gpu switches the base of `app` to the CUDA image.
    args = dict(i.value.partition("=")[::2] for i in PREAMBLE if i.keyword == "ARG")
    assert args["VARIANT"] == "cpu"
    assert BY_NAME["app"].base == "${VARIANT}-base"
    assert {"cpu-base", "gpu-base"} <= set(BY_NAME)
    assert BY_NAME["cpu-base"].base == "${PYTHON_IMAGE}"
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert re.fullmatch(r"pytorch/pytorch:[\w.\-]+cuda12[\w.\-]*runtime", args["GPU_IMAGE"])


def test_torch_is_the_pinned_cpu_wheel() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    stage = BY_NAME["cpu-base"]
    torch_arg = next(i.value for i in stage.all("ARG") if i.value.startswith("TORCH_VERSION="))
    assert pinned == "torch==" + torch_arg.split("=")[1]
    index_arg = next(i.value for i in stage.all("ARG") if i.value.startswith("TORCH_INDEX_URL="))
    assert index_arg == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    run = " ".join(i.value for i in stage.all("RUN"))
    assert '--index-url "${TORCH_INDEX_URL}"' in run


def test_default_bases_are_the_official_images() -> None:
    # scripts/image-test.sh builds on stand-in bases through build args only: nothing of
    # them may reach the files that real Docker reads.
    args = dict(i.value.partition("=")[::2] for i in PREAMBLE if i.keyword == "ARG")
    assert args["MARIADB_IMAGE"] == "mariadb:10.11"
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    for name in ("Dockerfile", "docker-compose.yml", "docker/entrypoint.sh"):
        text = (ROOT / name).read_text()
        assert "standin" not in text and "localhost/" not in text, name


def test_entrypoint_is_exec_form_and_the_script_execs() -> None:
    app = BY_NAME["app"]
    (entrypoint,) = app.all("ENTRYPOINT")
    argv = entrypoint.exec_form()
    assert argv == ["/usr/local/bin/recsql-entrypoint"], "shell form would swallow SIGTERM"
    assert app.all("CMD")[-1].exec_form() == ["serve"]
    copies = [c.value.split() for c in app.all("COPY")]
    assert any(c[-2:] == ["docker/entrypoint.sh", argv[0]] and "--chmod=0755" in c for c in copies)
    script = (ROOT / "docker/entrypoint.sh").read_text()
    assert script.startswith("#!/bin/sh\n")
    calls = [ln.strip() for ln in script.splitlines() if re.match(r"\s*(recsql|python)\b", ln)]
    assert calls == [], f"commands run without exec: {calls}"


def test_sagemaker_labels_port_and_healthcheck() -> None:
    app = BY_NAME["app"]
    labels = app.labels()
    assert labels["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert labels["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"
    assert [e.value for e in app.all("EXPOSE")] == ["8080"]
    (health,) = app.all("HEALTHCHECK")
    assert health.exec_form() == ["/usr/local/bin/recsql-entrypoint", "healthcheck"]
    # Docker's default 30 s timeout would outlast SageMaker's 2 s /ping budget by far.
    assert "--timeout=5s" in health.value and "--start-period=" in health.value


def test_local_image_runs_as_the_uid_that_owns_opt_ml() -> None:
    run = " ".join(i.value for i in BY_NAME["app"].all("RUN"))
    uid = re.search(r"useradd [^&]*--uid (\d+)", run).group(1)
    gid = re.search(r"groupadd [^&]*--gid (\d+)", run).group(1)
    assert int(uid) >= 1000
    assert [u.value for u in BY_NAME["local"].all("USER")] == [f"{uid}:{gid}"]
    assert "chown -R recsql:recsql /opt/ml" in run
    # The SageMaker target stays root, as SageMaker's containers must.
    assert BY_NAME["sagemaker"].all("USER") == [] and BY_NAME["app"].all("USER") == []


def test_mariadb_stage_installs_function_allow_list_and_init_scripts() -> None:
    build, db = BY_NAME["udf-build"], BY_NAME["mariadb"]
    assert build.base == db.base == "${MARIADB_IMAGE}"
    assert "make" in build.all("RUN")[-1].value
    assert "libcurl4-openssl-dev" in build.all("RUN")[0].value
    copies = [c.value.split() for c in db.all("COPY")]
    targets = {c[-1]: c for c in copies}
    assert "--from=udf-build" in targets["/usr/lib/mysql/plugin/recsql_udf.so"]
    allow = targets["/etc/mysql/recsql-endpoints.conf"]
    assert "--chmod=0644" in allow, "the function refuses an allow-list others may write"
    assert targets["/docker-entrypoint-initdb.d/"][-2] == "docker/mariadb/initdb/"
    assert "libcurl4" in db.all("RUN")[0].value


def test_every_copy_source_exists() -> None:
    for stage in STAGES:
        for copy in stage.all("COPY"):
            parts = [p for p in copy.value.split() if not p.startswith("--")]
            if "--from=" in copy.value:
                continue
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"stage {stage.name}: COPY {source} is missing"


def test_the_app_copies_every_package_the_cli_imports() -> None:
    # `recsql --help` imports every subcommand's package: one left out breaks it in the image
    from recsql_cli import COMMANDS

    copied = {c.value.split()[0].rstrip("/") for c in BY_NAME["app"].all("COPY")}
    packages = {module.split(".")[0] for module in COMMANDS.values()}
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"


def test_dockerignore_keeps_the_virtualenv_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_hadolint_finds_nothing() -> None:
    out = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_shellcheck_passes_the_entrypoint_and_the_image_test() -> None:
    scripts = [
        "docker/entrypoint.sh",
        "scripts/image-test.sh",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docker/standin").glob("*.sh")),
    ]
    assert "docker/standin/docker-entrypoint.sh" in scripts
    out = subprocess.run(
        [_tool("shellcheck"), *(str(ROOT / s) for s in scripts)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
