"""HTTP routes: translate requests to DataPlane calls and replies back. Nothing else.

Errors: every RecsqlError becomes its status with a one-line text body, in
one handler; anything unexpected is a generic 500 whose traceback goes to
the log only.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from model.errors import BadRequest, ModelNotFound, PayloadTooLarge, RecsqlError
from serve.handlers import DataPlane, Invocation
from serve.openapi import OPENAPI

log = logging.getLogger("recsql.serve")


def _text(message: str, status: int) -> Response:
    return Response(
        message.splitlines()[0] + "\n" if message else "", status, mimetype="text/plain"
    )


def _json(doc: Any, status: int = 200) -> Response:
    return Response(json.dumps(doc), status, mimetype="application/json")


def _read_body(limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes before reading them all."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"body of {length} bytes exceeds the {limit}-byte limit")
    body = request.stream.read(limit + 1) if length is None else request.get_data(cache=False)
    if len(body) > limit:
        raise PayloadTooLarge(f"body exceeds the {limit}-byte limit")
    return body


def create_app(dataplane: DataPlane) -> Flask:
    app = Flask("recsql.serve", static_folder=None)
    config = dataplane.config

    @app.errorhandler(RecsqlError)
    def _recsql_error(exc: RecsqlError) -> Response:
        if exc.status >= 500:
            log.error("%s %s -> %d: %s", request.method, request.path, exc.status, exc)
        return _text(str(exc), exc.status)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _text(f"{exc.code} {exc.name}: {request.method} {request.path}", exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.path)
        return _text("internal server error (details are in the server log)", 500)

    @app.get("/ping")
    def ping() -> Response:
        ready, reason = dataplane.ping()
        return Response(b"", 200, mimetype="text/plain") if ready else _text(reason, 503)

    @app.get("/execution-parameters")
    def execution_parameters() -> Response:
        return _json(dataplane.execution_parameters())

    def _invoke(target: str | None) -> Response:
        headers = request.headers
        reply = dataplane.invoke(
            Invocation(
                body=_read_body(config.max_payload_bytes),
                content_type=headers.get("Content-Type"),
                accept=headers.get("Accept"),
                custom_attributes=headers.get("X-Amzn-SageMaker-Custom-Attributes"),
                target_model=target,
                inference_id=headers.get("X-Amzn-SageMaker-Inference-Id"),
                headers=headers,  # case-insensitive; only user scripts read it
            )
        )
        return Response(
            reply.body, reply.status, headers=reply.headers, content_type=reply.content_type
        )

    @app.post("/invocations")
    def invocations() -> Response:
        return _invoke(request.headers.get("X-Amzn-SageMaker-Target-Model"))

    @app.post("/endpoints/<name>/invocations")
    def endpoint_invocations(name: str) -> Response:
        # The local stand-in for the SageMaker runtime API: the endpoint name picks a
        # model of that name, else the target-model header, else the only model.
        target = request.headers.get("X-Amzn-SageMaker-Target-Model")
        return _invoke(name if dataplane.registry.has(name) else target)

    def _multi_model() -> None:
        if not config.multi_model:
            raise ModelNotFound(
                "the /models API is off; start with --multi-model or SAGEMAKER_MULTI_MODEL=true"
            )

    @app.get("/models")
    def list_models() -> Response:
        _multi_model()
        args = request.args
        token = args.get("next_page_token") or args.get("nextPageToken")
        size = args.get("page_size") or args.get("limit")
        return _json(dataplane.list_models(size, token))

    @app.post("/models")
    def load_model() -> Response:
        _multi_model()
        try:
            doc = json.loads(_read_body(64 * 1024))
        except ValueError:
            raise BadRequest('send {"model_name": "...", "url": "/path/to/model/dir"}') from None
        return _json(dataplane.load_model(doc))

    @app.get("/models/<name>")
    def describe_model(name: str) -> Response:
        _multi_model()
        if not dataplane.registry.has(name):
            raise ModelNotFound(f"model {name!r} is not loaded")
        return _json(dataplane.describe_model(name))

    @app.delete("/models/<name>")
    def unload_model(name: str) -> Response:
        _multi_model()
        return _json(dataplane.unload_model(name))

    @app.post("/models/<name>/invoke")
    def invoke_model(name: str) -> Response:
        _multi_model()
        if not dataplane.registry.has(name):
            raise ModelNotFound(f"model {name!r} is not loaded")
        return _invoke(name)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(dataplane.metrics.render(), mimetype="text/plain; version=0.0.4")

    @app.get("/openapi.json")
    def openapi() -> Response:
        return _json(OPENAPI)

    return app
