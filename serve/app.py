"""HTTP routes: translate requests to DataPlane calls and replies back. Nothing else.

Errors: every RecsqlError becomes its status with a one-line text body, in
one handler; anything unexpected is a generic 500 whose traceback goes to
the log only.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, request
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException

from model.errors import BadRequest, ModelNotFound, PayloadTooLarge, RecsqlError
from serve.handlers import DataPlane, Invocation
from serve.openapi import OPENAPI

log = logging.getLogger("recsql.serve")


def _one_line(message: str) -> str:
    return message.splitlines()[0] + "\n" if message else ""


def _text(message: str, status: int) -> Response:
    return Response(_one_line(message), status, mimetype="text/plain")


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

    app.wsgi_app = _InvocationsFastPath(app.wsgi_app, dataplane)  # type: ignore[method-assign]
    return app


class _InvocationsFastPath:
    """`POST /invocations` straight from the WSGI environ.

    Aurora's loadable-function path sends one row per request, so the framework's
    per-request cost is most of the latency: building Flask's request and response
    objects costs about as much as scoring. This does the same as the
    `invocations` route above (same DataPlane call, same one-line errors) without
    them; every other path goes to Flask.
    """

    def __init__(self, flask_app: Any, dataplane: DataPlane) -> None:
        self.flask_app, self.dataplane = flask_app, dataplane
        self.limit = dataplane.config.max_payload_bytes

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != "/invocations" or environ.get("REQUEST_METHOD") != "POST":
            return self.flask_app(environ, start_response)
        try:
            get = environ.get
            reply = self.dataplane.invoke(
                Invocation(
                    body=self._body(environ),
                    content_type=get("CONTENT_TYPE") or None,
                    accept=get("HTTP_ACCEPT"),
                    custom_attributes=get("HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES"),
                    target_model=get("HTTP_X_AMZN_SAGEMAKER_TARGET_MODEL"),
                    inference_id=get("HTTP_X_AMZN_SAGEMAKER_INFERENCE_ID"),
                    headers=EnvironHeaders(environ),
                )
            )
            status, body, content_type = reply.status, reply.body, reply.content_type
            headers = list(reply.headers.items())
        except RecsqlError as exc:
            if exc.status >= 500:
                log.error("POST /invocations -> %d: %s", exc.status, exc)
            status, body = exc.status, _one_line(str(exc)).encode()
            content_type, headers = "text/plain; charset=utf-8", []
        except Exception:
            log.exception("POST /invocations failed")
            status, content_type, headers = 500, "text/plain; charset=utf-8", []
            body = b"internal server error (details are in the server log)\n"
        if isinstance(body, str):
            body = body.encode()
        headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [body]

    def _body(self, environ: dict[str, Any]) -> bytes:
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        try:
            size = int(length) if length else None
        except ValueError:
            raise BadRequest(f"bad Content-Length {length!r}") from None
        if size is not None and size > self.limit:
            raise PayloadTooLarge(f"body of {size} bytes exceeds the {self.limit}-byte limit")
        body = stream.read(self.limit + 1) if size is None else stream.read(size)
        if len(body) > self.limit:
            raise PayloadTooLarge(f"body exceeds the {self.limit}-byte limit")
        return body
