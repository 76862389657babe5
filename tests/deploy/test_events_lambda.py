"""deploy/events_lambda.py: the Lambda between Aurora's trigger (lambda_async) and the
SageMaker endpoint. moto's sagemaker-runtime never reaches a container: it answers from a
queue of canned results and keeps each request it saw, which is what these tests read.
Its runtime cannot raise ModelError, so the 400/503 paths use botocore's Stubber."""

from __future__ import annotations

import base64
import json

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID

from deploy import events_lambda

REGION = "eu-west-1"
ENDPOINT = "recsql-endpoint"


@pytest.fixture
def runtime(monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("RECSQL_ENDPOINT_NAME", ENDPOINT)
    with mock_aws():
        yield boto3.client("sagemaker-runtime", region_name=REGION)


def moto_backend():
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    return sagemakerruntime_backends[DEFAULT_ACCOUNT_ID][REGION]


def requests_seen() -> list[dict]:
    """The requests moto's runtime received: headers and body. moto 5.2 files them under
    the endpoint name None (it does not read the name from the path), so the name is
    checked with the Stubber below instead."""
    keys = [key for by_body in moto_backend().results.values() for key in by_body]
    return [json.loads(base64.b64decode(key)) for key in keys]


def test_a_trigger_payload_becomes_one_invoke_endpoint(runtime) -> None:
    moto_backend().results_queue.append(
        (json.dumps({"taken": 1, "users": 1}), "application/json", "AllTraffic", "")
    )
    payload = json.dumps(  # what the trigger's JSON_OBJECT gives for a row with NULLs
        {"events": [{"user_id": 7, "product_id": 8, "event_type": None, "event_time": None}]}
    )
    assert events_lambda.handler(payload, None, runtime) == {"taken": 1, "rejected": 0}
    (seen,) = requests_seen()
    assert json.loads(seen["Body"]) == {"events": [{"user_id": 7, "product_id": 8}]}
    assert seen["Accept"] == "application/json"


def test_target_model_goes_as_the_header(runtime, monkeypatch) -> None:
    monkeypatch.setenv("RECSQL_TARGET_MODEL", "history.tar.gz")
    moto_backend().results_queue.append((json.dumps({"taken": 2}), "application/json", "", ""))
    event = {"events": [{"session_id": -5, "product_id": 1}, {"session_id": -5, "product_id": 2}]}
    assert events_lambda.handler(event, None, runtime)["taken"] == 2
    (seen,) = requests_seen()
    headers = {k.lower(): v for k, v in seen.items()}
    assert headers["x-amzn-sagemaker-target-model"] == "history.tar.gz"
    assert len(json.loads(seen["Body"])["events"]) == 2


def _model_error(stub: Stubber, status: int, message: str) -> None:
    stub.add_client_error(
        "invoke_endpoint",
        service_error_code="ModelError",
        http_status_code=424,
        modeled_fields={"OriginalStatusCode": status, "OriginalMessage": message},
    )


def _taken(stub: Stubber, n: int) -> None:
    from io import BytesIO

    from botocore.response import StreamingBody

    body = json.dumps({"taken": n, "users": 1}).encode()
    stub.add_response("invoke_endpoint", {"Body": StreamingBody(BytesIO(body), len(body))})


def test_a_rejected_batch_keeps_its_good_entries(monkeypatch) -> None:
    """A 400 (ModelError, OriginalStatusCode 400) is the entries' fault: retrying cannot
    help, so each entry goes alone, the bad one is logged, and the handler returns."""
    monkeypatch.setenv("RECSQL_ENDPOINT_NAME", ENDPOINT)
    client = boto3.client(
        "sagemaker-runtime",
        region_name=REGION,
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    event = {"events": [{"user_id": 1, "product_id": 2}, {"user_id": 1, "product_id": "x"}]}
    with Stubber(client) as stub:
        _model_error(stub, 400, "events: nothing taken, 1 of 2 entries rejected: entry 2: ...")
        _taken(stub, 1)
        _model_error(stub, 400, "events: nothing taken, 1 of 1 entries rejected: entry 1: ...")
        assert events_lambda.handler(event, None, client) == {"taken": 1, "rejected": 1}
        stub.assert_no_pending_responses()
    with Stubber(client) as stub:  # the request itself, as boto3 builds it
        body = json.dumps({"events": [{"user_id": 1, "product_id": 2}]}, separators=(",", ":"))
        expected = {
            "EndpointName": ENDPOINT,
            "ContentType": "application/json",
            "Accept": "application/json",
            "Body": body,
        }
        from io import BytesIO

        from botocore.response import StreamingBody

        reply = json.dumps({"taken": 1}).encode()
        stub.add_response(
            "invoke_endpoint", {"Body": StreamingBody(BytesIO(reply), len(reply))}, expected
        )
        assert events_lambda.handler({"user_id": 1, "product_id": 2}, None, client)["taken"] == 1
    with Stubber(client) as stub:  # a store that is down: raise, so Lambda retries
        _model_error(stub, 503, "event store unavailable")
        with pytest.raises(client.exceptions.ModelError):
            events_lambda.handler(event, None, client)


def test_bad_payloads_and_settings_are_errors(runtime, monkeypatch) -> None:
    for payload in ({"events": []}, {"events": [1]}, "[1, 2]"):
        with pytest.raises(ValueError, match="event"):
            events_lambda.handler(payload, None, runtime)
    assert requests_seen() == []
    monkeypatch.setenv("RECSQL_ENDPOINT_NAME", "http://evil")
    with pytest.raises(ValueError, match="RECSQL_ENDPOINT_NAME"):
        events_lambda.handler({"events": [{"user_id": 1, "product_id": 2}]}, None, runtime)
