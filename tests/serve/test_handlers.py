"""The plain dataplane handler, called in-process (decode -> predict -> encode)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.errors import BadRequest, PayloadTooLarge, RecsqlError
from serve import DataPlane, Invocation, build_dataplane, from_env
from serve.handlers import parse_attributes
from tests.serve.conftest import PRODUCT_IDS, USER_IDS


@pytest.fixture(scope="module")
def plane(model_dir) -> DataPlane:
    return build_dataplane(from_env({}, model_dir=model_dir))


def test_csv_in_csv_out(plane, recommender) -> None:
    reply = plane.invoke(Invocation(f"{USER_IDS[0]},{PRODUCT_IDS[1]}\n".encode(), "text/csv"))
    want = recommender.score(USER_IDS[:1], PRODUCT_IDS[1:2])[0]
    assert reply.content_type == "text/csv"
    assert float(reply.body) == pytest.approx(float(want), rel=1e-6)
    assert reply.headers["X-Recsql-Null-Rows"] == "0"


def test_per_user_exclude_lists(plane, recommender) -> None:
    users = [int(USER_IDS[0]), int(USER_IDS[1])]
    best = [recommender.top_k(u, 2)[0].tolist() for u in users]
    doc = {"user_id": users, "top_k": 1, "exclude": [best[0][:1], best[1][:1]]}
    reply = plane.invoke(Invocation(json.dumps(doc).encode(), "application/json"))
    got = [p["product_ids"] for p in json.loads(reply.body)["predictions"]]
    assert got == [best[0][1:2], best[1][1:2]]
    doc["exclude"] = [[1], [2], [3]]
    with pytest.raises(BadRequest, match="3 lists for 2 users"):
        plane.invoke(Invocation(json.dumps(doc).encode(), "application/json"))


def test_payload_limit_in_the_handler(model_dir) -> None:
    small = build_dataplane(from_env({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"}, model_dir=model_dir))
    with pytest.raises(PayloadTooLarge):
        small.invoke(Invocation(b"1,2\n" * 300_000, "text/csv"))


def test_batch_execution_parameters(model_dir) -> None:
    env = {
        "SAGEMAKER_BATCH": "true",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20",
        "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "3",
    }
    plane = build_dataplane(from_env(env, model_dir=model_dir))
    assert plane.execution_parameters() == {
        "MaxConcurrentTransforms": 3,
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": 20,
    }
    body = b"".join(b"%d,%d\n" % (USER_IDS[i % 300], PRODUCT_IDS[i % 500]) for i in range(800_000))
    assert len(body) > 6 * 1024 * 1024
    reply = plane.invoke(Invocation(body, "text/csv"))
    assert reply.body.count(b"\n") == 800_000


def test_fallback_from_env(model_dir, recommender) -> None:
    plane = build_dataplane(from_env({"RECSQL_FALLBACK": "popularity"}, model_dir=model_dir))
    reply = plane.invoke(Invocation(f"1,{PRODUCT_IDS[3]}\n".encode(), "text/csv"))
    assert float(reply.body) == pytest.approx(float(recommender.item_popularity[3]), rel=1e-6)
    override = plane.invoke(
        Invocation(f"1,{PRODUCT_IDS[3]}\n".encode(), "text/csv", custom_attributes="fallback=null")
    )
    assert override.body == b"\n"


def test_metrics_render_in_process(plane) -> None:
    plane.invoke(Invocation(b"1,2\n", "text/csv"))
    text = plane.metrics.render()
    series = 'recsql_rows_total{model="model",variant="AllTraffic"} '
    assert series in text
    assert np.isfinite(float(text.split(series)[1].split()[0]))


def test_parse_attributes() -> None:
    assert parse_attributes("fallback=mean; top_k=5,junk,=x") == {"fallback": "mean", "top_k": "5"}
    assert parse_attributes(None) == {}


def test_log_every_samples_successes_and_keeps_every_failure(model_dir, caplog) -> None:
    plane = build_dataplane(from_env({"RECSQL_LOG_EVERY": "3"}, model_dir=model_dir))
    good = Invocation(f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n".encode(), "text/csv")
    with caplog.at_level("INFO", logger="recsql.serve"):
        for _ in range(7):
            plane.invoke(good)
        with pytest.raises(RecsqlError):
            plane.invoke(Invocation(b"1,2\n", "text/plain"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("invocations")]
    assert [line.split()[2] for line in lines] == ["status=200"] * 3 + ["status=415"]
    with pytest.raises(Exception, match="RECSQL_LOG_EVERY"):
        from_env({"RECSQL_LOG_EVERY": "x"})
    with pytest.raises(Exception, match="log_every must be >= 1"):
        from_env({"RECSQL_LOG_EVERY": "0"})
