"""HTTP routes: translate requests to DataPlane calls and replies back. Nothing else.

Errors: every RecsqlError becomes its status with a one-line text body, in
one handler; anything unexpected is a generic 500 whose traceback goes to
the log only. An invocation's reply, error or not, names the production
variant that took it (`X-Amzn-Invoked-Production-Variant`) once one was
chosen; work a reply leaves behind (the shadow variant's) starts only once
the reply has been sent.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, request
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException

from model.errors import BadRequest, ModelNotFound, PayloadTooLarge, RecsqlError
from serve.handlers import DataPlane, Invocation, error_headers
from serve.openapi import OPENAPI

log = logging.getLogger("recsql.serve")


def _one_line(message: str) -> str:
    return message.splitlines()[0] + "\n" if message else ""


def _text(message: str, status: int) -> Response:
    return Response(_one_line(message), status, mimetype="text/plain")


def _json(doc: Any, status: int = 200) -> Response:
    return Response(json.dumps(doc), status, mimetype="application/json")


def _read_limited(stream: Any, length: int | None, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes before reading them all."""
    if length is not None and length > limit:
        raise PayloadTooLarge(f"body of {length} bytes exceeds the {limit}-byte limit")
    body = stream.read(limit + 1) if length is None else stream.read(length)
    if len(body) > limit:
        raise PayloadTooLarge(f"body exceeds the {limit}-byte limit")
    return body


def _read_body(limit: int) -> bytes:
    return _read_limited(request.stream, request.content_length, limit)


def _invocation(body: bytes, headers: EnvironHeaders, target: str | None) -> Invocation:
    return Invocation(
        body=body,
        content_type=headers.get("Content-Type") or None,
        accept=headers.get("Accept"),
        custom_attributes=headers.get("X-Amzn-SageMaker-Custom-Attributes"),
        target_model=target,
        inference_id=headers.get("X-Amzn-SageMaker-Inference-Id"),
        headers=headers,  # case-insensitive; only user scripts read it
        target_variant=headers.get("X-Amzn-SageMaker-Target-Variant") or None,
    )


def _in_background(work: Callable[[], None] | None) -> None:
    """Start `work` beside the request path: a greenlet under gevent workers (threading is
    patched there), a thread otherwise. The work handles its own errors."""
    if work is not None:
        threading.Thread(target=work, name="recsql-after-reply", daemon=True).start()


class _Body:
    """A WSGI body whose close() (called by the server once the body is sent) starts the
    reply's `after` work: the caller never waits for it."""

    def __init__(self, body: bytes, after: Callable[[], None] | None) -> None:
        self.body, self.after = body, after

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        _in_background(self.after)


def _failure(exc: Exception, where: str) -> tuple[int, str]:
    """The one mapping of an exception to (status, one-line message). A RecsqlError
    carries its own; anything else is a 500 whose traceback goes to the log only."""
    if isinstance(exc, RecsqlError):
        if exc.status >= 500:
            log.error("%s -> %d: %s", where, exc.status, exc)
        return exc.status, _one_line(str(exc))
    log.error("%s failed", where, exc_info=exc)
    return 500, "internal server error (details are in the server log)\n"


def create_app(dataplane: DataPlane) -> Flask:
    app = Flask("recsql.serve", static_folder=None)
    config = dataplane.config

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _text(f"{exc.code} {exc.name}: {request.method} {request.path}", exc.code or 500)

    @app.errorhandler(Exception)
    def _error(exc: Exception) -> Response:
        status, message = _failure(exc, f"{request.method} {request.path}")
        return Response(message, status, headers=error_headers(exc), mimetype="text/plain")

    @app.get("/ping")
    def ping() -> Response:
        ready, reason = dataplane.ping()
        return Response(b"", 200, mimetype="text/plain") if ready else _text(reason, 503)

    @app.get("/execution-parameters")
    def execution_parameters() -> Response:
        return _json(dataplane.execution_parameters())

    def _invoke(target: str | None) -> Response:
        body = _read_body(config.max_payload_bytes)
        reply = dataplane.invoke(_invocation(body, request.headers, target))
        response = Response(
            reply.body, reply.status, headers=reply.headers, content_type=reply.content_type
        )
        if reply.after is not None:
            response.call_on_close(partial(_in_background, reply.after))
        return response

    # Answered by _InvocationsFastPath below; registered so the route table (which the
    # OpenAPI document is checked against) names every path the server answers.
    @app.post("/invocations")
    def invocations() -> Response:
        return _invoke(request.headers.get("X-Amzn-SageMaker-Target-Model"))

    @app.post("/endpoints/<name>/invocations")
    def endpoint_invocations(name: str) -> Response:
        # The local stand-in for the SageMaker runtime API: the endpoint name picks a
        # model of that name, else the target-model header, else the only model.
        target = request.headers.get("X-Amzn-SageMaker-Target-Model")
        return _invoke(name if dataplane.registry.has(name) else target)

    @app.post("/events")
    def events() -> Response:
        body = _read_body(config.max_payload_bytes)
        return _json(dataplane.post_events(body, request.headers.get("Content-Type")))

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
            headers = EnvironHeaders(environ)
            body = _read_limited(environ["wsgi.input"], self._length(environ), self.limit)
            invocation = _invocation(body, headers, headers.get("X-Amzn-SageMaker-Target-Model"))
            reply = self.dataplane.invoke(invocation)
            status, body, content_type = reply.status, reply.body, reply.content_type
            response_headers, after = list(reply.headers.items()), reply.after
        except Exception as exc:
            status, message = _failure(exc, "POST /invocations")
            body, content_type = message, "text/plain; charset=utf-8"
            response_headers, after = list(error_headers(exc).items()), None
        if isinstance(body, str):
            body = body.encode()
        response_headers += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        start_response(f"{status} {HTTPStatus(status).phrase}", response_headers)
        return [body] if after is None else _Body(body, after)

    @staticmethod
    def _length(environ: dict[str, Any]) -> int | None:
        length = environ.get("CONTENT_LENGTH")
        try:
            return int(length) if length else None
        except ValueError:
            raise BadRequest(f"bad Content-Length {length!r}") from None
