"""Safety of the multi-model load API: nothing outside the model root is ever loaded.

tests/serve/test_mme.py::test_bad_load_requests covers '/etc', '../' and bad
names; here a *valid* model sits just outside the root and every way of
pointing at it (absolute path, '..', file:// URL, a symlinked directory,
percent-encoding) is refused, and nothing gets listed or served.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.conftest import PRODUCT_IDS, USER_IDS, Server, make_artifact, running

PAIR = f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path]]:
    tmp = tmp_path_factory.mktemp("safety")
    root, outside = tmp / "models", tmp / "outside"
    make_artifact(root / "inside" / "model", seed=1)
    make_artifact(outside / "model", seed=2)  # loadable, but not below the root
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "sibling").symlink_to(tmp / "models-evil", target_is_directory=True)
    make_artifact(tmp / "models-evil" / "model", seed=3)  # shares the root's name prefix
    args = ["--multi-model", "--model-root", str(root), "--workers", "1"]
    with running(args, tmp) as srv:
        yield srv, root, outside


@pytest.mark.parametrize(
    "url",
    [
        "{outside}/model",
        "{root}/../outside/model",
        "../outside/model",
        "inside/../../outside/model",
        "file://{outside}/model",
        "link/model",
        "{root}/link/model",
        "sibling/model",
        "{root}-evil/model",
        "%2e%2e/outside/model",
    ],
)
def test_load_url_outside_the_root_is_refused(layout, url: str) -> None:
    srv, root, outside = layout
    url = url.format(root=root, outside=outside)
    r = srv.session.post(srv.url + "/models", json={"model_name": "escape", "url": url})
    assert r.status_code in (400, 404), (url, r.status_code, r.text)
    assert r.text.count("\n") == 1  # one-line reason
    assert [m["modelName"] for m in srv.get("/models").json()["models"]] == []
    assert srv.post("/models/escape/invoke", PAIR).status_code == 404


def test_a_model_below_the_root_still_loads(layout) -> None:
    srv, _, _ = layout
    r = srv.session.post(srv.url + "/models", json={"model_name": "ok", "url": "inside/model"})
    assert r.status_code == 200, r.text
    try:
        assert srv.post("/models/ok/invoke", PAIR).status_code == 200
    finally:
        assert srv.session.delete(srv.url + "/models/ok").status_code == 200
