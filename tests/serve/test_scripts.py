"""User scripts (code/inference.py) in the SageMaker framework-container style."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from model.errors import ArtifactError
from serve import DataPlane, Invocation, build_dataplane, from_env
from serve.scripts import ScriptModel, load_servable
from tests.serve.conftest import PRODUCT_IDS, USER_IDS, running

# Written like the seed's hosting functions: model_fn(model_dir) plus
# transform_fn(net, data, input_content_type, output_content_type) -> (json, type).
SEED_STYLE = """
import json
import time

import numpy as np

from model import load_model


def model_fn(model_dir):
    return load_model(model_dir)


def transform_fn(net, data, input_content_type, output_content_type):
    parsed = json.loads(data)
    time.sleep(parsed.get("sleep", 0))
    outputs = net.score(np.array(parsed["customer_id"]), np.array(parsed["product_id"]))
    response_body = json.dumps([None if o != o else float(o) for o in outputs])
    return response_body, output_content_type
"""

SPLIT_HANDLERS = """
import json

from model import load_model


def model_fn(model_dir, context):
    model = load_model(model_dir)
    model.seen_dir = context.system_properties["model_dir"]
    return model


def input_fn(body, content_type, context):
    assert content_type == "application/x-pairs"
    return [tuple(int(x) for x in line.split(b":")) for line in body.splitlines()]


def predict_fn(data, model):
    users, products = zip(*data)
    return model.score(list(users), list(products))


def output_fn(prediction, accept):
    return ";".join(f"{p:.3f}" for p in prediction)
"""


def script_dir(model_dir: Path, tmp: Path, source: str, name: str = "inference.py") -> Path:
    target = tmp / "with_script"
    shutil.copytree(model_dir, target)
    (target / "code").mkdir()
    (target / "code" / name).write_text(textwrap.dedent(source))
    return target


def test_seed_style_script_over_http(model_dir, recommender, tmp_path) -> None:
    served = script_dir(model_dir, tmp_path, SEED_STYLE)
    with running(["--model-dir", str(served), "--workers", "1"], tmp_path) as srv:
        assert srv.get("/ping").status_code == 200
        users, products = USER_IDS[:3].tolist(), PRODUCT_IDS[:3].tolist()
        doc = json.dumps({"customer_id": users, "product_id": products})
        r = srv.post("/invocations", doc, "application/json", Accept="application/json")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/json"
        want = recommender.score(np.array(users), np.array(products))
        assert r.json() == pytest.approx(want.tolist(), rel=1e-6)
        assert "user script" in srv.log()


def test_split_handlers_with_context(model_dir, recommender, tmp_path) -> None:
    served = script_dir(model_dir, tmp_path, SPLIT_HANDLERS)
    plane = build_dataplane(from_env({}, model_dir=served))
    model = plane.registry.default
    assert isinstance(model, ScriptModel)
    assert model.model.seen_dir == str(served)
    u, p = int(USER_IDS[2]), int(PRODUCT_IDS[3])
    reply = plane.invoke(Invocation(f"{u}:{p}\n{u}:{p}".encode(), "application/x-pairs", "text/x"))
    want = float(recommender.score(np.array([u]), np.array([p]))[0])
    assert reply.body.decode() == f"{want:.3f};{want:.3f}"
    assert reply.content_type == "text/x"


def test_model_fn_only_uses_recsql_codecs(model_dir, recommender, tmp_path) -> None:
    served = script_dir(
        model_dir, tmp_path, "from model import load_model\nmodel_fn = load_model\n"
    )
    plane = build_dataplane(from_env({}, model_dir=served))
    u, p = int(USER_IDS[2]), int(PRODUCT_IDS[3])
    reply = plane.invoke(Invocation(f"{u},{p}\nx\n".encode(), "text/csv"))
    want = float(recommender.score(np.array([u]), np.array([p]))[0])
    lines = reply.body.decode().split("\n")
    assert float(lines[0]) == pytest.approx(want, rel=1e-6) and lines[1:] == ["", ""]


def test_submit_directory_and_program(model_dir, tmp_path) -> None:
    code = tmp_path / "submit"
    code.mkdir()
    (code / "custom.py").write_text(
        "def model_fn(model_dir):\n    return 'm'\n"
        "def transform_fn(model, body, content_type, accept):\n    return body[::-1]\n"
    )
    env = {"SAGEMAKER_SUBMIT_DIRECTORY": str(code), "SAGEMAKER_PROGRAM": "custom.py"}
    plane = build_dataplane(from_env(env, model_dir=model_dir))
    reply = plane.invoke(Invocation(b"abc", "text/csv", "text/csv"))
    assert reply.body == b"cba" and reply.content_type == "text/csv"


def test_transform_fn_with_the_other_handlers_is_refused(model_dir, tmp_path) -> None:
    source = SEED_STYLE + "\ndef input_fn(body, content_type):\n    return body\n"
    served = script_dir(model_dir, tmp_path, source)
    with pytest.raises(ArtifactError, match="transform_fn together"):
        load_servable(served)
    plane: DataPlane = build_dataplane(from_env({}, model_dir=served))
    ready, reason = plane.ping()
    assert not ready and "transform_fn together" in reason
