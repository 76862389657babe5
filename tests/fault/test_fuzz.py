"""Bad input at scale: generated requests from /openapi.json never get a 5xx or kill a worker.

The default run sends a few hundred requests; the slow-marked test sends
10,000 (bench/fuzz_http.py does the same from the command line and prints
the figures).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.fuzz import PICKLED_EXIT_NPY, run_fuzz
from tests.fault.loadgen import children, wait_for_workers
from tests.serve.conftest import Server, make_artifact, running


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two workers, a startup model and the /models API over a root holding one model."""
    tmp = tmp_path_factory.mktemp("fuzz")
    make_artifact(tmp / "root" / "fz" / "model", seed=5)
    args = ["--model-dir", str(model_dir), "--workers", "2", "--model-root", str(tmp / "root")]
    with running(args, tmp, {"SAGEMAKER_MULTI_MODEL": "true"}) as srv:
        wait_for_workers(srv.proc.pid, 2)
        yield srv


def fuzz_and_check(srv: Server, count: int, random_seed: int) -> None:
    workers = children(srv.proc.pid)
    report = run_fuzz(srv.url, count, random_seed)
    print(f"\n{report.sent} requests: {report.classes()} by path {dict(report.by_operation)}")
    assert report.sent >= count
    assert report.at_least_500() == 0, "\n".join(report.server_errors)
    assert not report.connection_errors, "\n".join(report.connection_errors[:5])
    assert children(srv.proc.pid) == workers  # the same workers: none died or was replaced
    assert srv.get("/ping").status_code == 200
    assert set(report.classes()) >= {"2xx", "4xx"}  # both good and bad requests were made


def test_generated_requests_never_get_5xx(fuzz_server: Server) -> None:
    fuzz_and_check(fuzz_server, 500, random_seed=1)


def test_a_pickle_that_would_kill_the_worker_is_refused(fuzz_server: Server) -> None:
    workers = children(fuzz_server.proc.pid)
    for path in ("/invocations", "/endpoints/x/invocations", "/models/model/invoke"):
        r = fuzz_server.post(path, PICKLED_EXIT_NPY, "application/x-npy")
        assert r.status_code == 400, r.text
    assert children(fuzz_server.proc.pid) == workers


@pytest.mark.slow
def test_ten_thousand_generated_requests_never_get_5xx(fuzz_server: Server) -> None:
    fuzz_and_check(fuzz_server, 10_000, random_seed=2)
