"""AWS Lambda handler: fresh events from Aurora MySQL to the recsql SageMaker endpoint.

Aurora cannot call SageMaker from a trigger, so its AFTER INSERT trigger (`recsql sql
install --engine aurora --events-table T --events-lambda ARN`, db/aurora.py) calls
`lambda_async(ARN, '{"events": [{"user_id": ..., "product_id": ..., ...}]}')`, and this
function POSTs the events to the endpoint with InvokeEndpoint (application/json: only
/invocations reaches a container, and the server takes `{"events": [...]}` there).

Self-contained (standard library + boto3, which Lambda provides): `zip -j
recsql-events.zip deploy/events_lambda.py`, handler `events_lambda.handler`. Settings from
the function's environment: RECSQL_ENDPOINT_NAME (required), RECSQL_TARGET_MODEL (a
multi-model endpoint's model, optional). Its role needs sagemaker:InvokeEndpoint on the
endpoint.

Failure policy. JSON null fields are left out (a NULL event_type is a view, a NULL
event_time is now), as the SQL functions do. The server rejects a request with a bad
entry whole (a 400, which SageMaker returns as ModelError with OriginalStatusCode 400):
retrying cannot help, so the handler sends each entry alone to keep the good ones, logs
the bad and returns normally. Anything else (throttling, a 5xx, 503 when the event store
is down) raises, so that Lambda retries the asynchronous event (twice by default) and then
hands it to the function's on-failure destination or drops it: the Aurora insert has long
been committed either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)

_NAME = re.compile(r"^[A-Za-z0-9](-*[A-Za-z0-9]){0,62}$")
MAX_EVENTS = 10_000


def handler(event: Any, context: Any = None, runtime: Any = None) -> dict[str, Any]:
    """{"events": [...]} (or one event object) -> {"taken": n, "rejected": m}."""
    endpoint = os.environ.get("RECSQL_ENDPOINT_NAME", "")
    if not _NAME.match(endpoint):
        raise ValueError(f"set RECSQL_ENDPOINT_NAME to the SageMaker endpoint, not {endpoint!r}")
    entries = clean_events(event)
    if runtime is None:
        import boto3

        runtime = boto3.client("sagemaker-runtime")
    target = os.environ.get("RECSQL_TARGET_MODEL") or None
    try:
        return {"taken": invoke(runtime, endpoint, entries, target), "rejected": 0}
    except Rejected as exc:
        if len(entries) == 1:
            log.warning("endpoint %s rejected the event %s: %s", endpoint, entries[0], exc)
            return {"taken": 0, "rejected": 1}
    taken = 0
    for entry in entries:  # one bad entry rejects a request whole: keep the good ones
        try:
            taken += invoke(runtime, endpoint, [entry], target)
        except Rejected as exc:
            log.warning("endpoint %s rejected the event %s: %s", endpoint, entry, exc)
    return {"taken": taken, "rejected": len(entries) - taken}


def clean_events(event: Any) -> list[dict[str, Any]]:
    """The entries of a trigger's payload, JSON nulls left out. A payload that is not
    events is a ValueError (Lambda retries it, then gives up: it never becomes good)."""
    if isinstance(event, str):
        event = json.loads(event)
    items = event.get("events") if isinstance(event, dict) and "events" in event else [event]
    if not isinstance(items, list) or not items or len(items) > MAX_EVENTS:
        raise ValueError(f'expected {{"events": [1..{MAX_EVENTS} event objects]}}')
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError(f"an event must be an object, not {item!r}")
        out.append({k: v for k, v in item.items() if v is not None})
    return out


class Rejected(Exception):
    """The endpoint answered 400: the events themselves are bad."""


def invoke(runtime: Any, endpoint: str, entries: list[dict[str, Any]], target: str | None) -> int:
    """One InvokeEndpoint with {"events": entries}; the number the server took."""
    request = {
        "EndpointName": endpoint,
        "ContentType": "application/json",
        "Accept": "application/json",
        "Body": json.dumps({"events": entries}, separators=(",", ":")),
    }
    if target:
        request["TargetModel"] = target
    try:
        reply = runtime.invoke_endpoint(**request)
    except runtime.exceptions.ModelError as exc:
        if exc.response.get("OriginalStatusCode") == 400:
            raise Rejected(exc.response.get("OriginalMessage") or str(exc)) from exc
        raise
    doc = json.loads(reply["Body"].read())
    return int(doc["taken"])
