"""The dataplane: plain request -> reply functions, testable without a server.

serve/app.py only turns HTTP into these calls. `invoke` is the whole
inference path: pick the model, decode -> predict -> encode, count, log.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.errors import BadRequest, PayloadTooLarge, RecsqlError
from serve import codecs
from serve.config import MB, TABULAR_OUTPUTS, ServeConfig
from serve.events import FreshEvents
from serve.metrics import Metrics
from serve.models import MAX_TOP_K, SCORES, Options, TabularServable
from serve.records import ColumnTable, Payload, Prediction
from serve.registry import ModelRegistry
from serve.scripts import ScriptModel

log = logging.getLogger("recsql.serve")


@dataclass
class Invocation:
    body: bytes
    content_type: str | None = None
    accept: str | None = None
    custom_attributes: str | None = None
    target_model: str | None = None
    inference_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


def parse_attributes(text: str | None) -> dict[str, str]:
    """`X-Amzn-SageMaker-Custom-Attributes`: `key=value` pairs split by ',' or ';'."""
    out: dict[str, str] = {}
    for part in (text or "").replace(";", ",").split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            out[key.strip().lower()] = value.strip()
    return out


def _top_k(value: Any) -> int | None:
    if value is None:
        return None
    try:
        k = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's -Infinity
        raise BadRequest(f"top_k must be an integer from 1 to {MAX_TOP_K}, not {value!r}") from None
    if isinstance(value, bool) or not 1 <= k <= MAX_TOP_K or str(k) != str(value).strip():
        raise BadRequest(f"top_k must be an integer from 1 to {MAX_TOP_K}, not {value!r}")
    return k


def _output(value: Any, tabular: bool, config: ServeConfig) -> str | None:
    """`output=label|probability`; RECSQL_TABULAR_OUTPUT is the default for tabular models."""
    if value is None or value == "":
        return config.tabular_output if tabular else None
    output = str(value).strip().lower()
    if output not in TABULAR_OUTPUTS:
        raise BadRequest(f"output {value!r} unknown; use {' or '.join(TABULAR_OUTPUTS)}")
    return output


def _score(value: Any) -> str:
    """`score=pair|similar`: what a pair record is (user, product) or (product, product)."""
    if value is None or value == "":
        return SCORES[0]
    score = str(value).strip().lower()
    if score not in SCORES:
        raise BadRequest(f"score {value!r} unknown; use {' or '.join(SCORES)}")
    return score


def _is_tabular(model: object) -> bool:
    inner = model.inner if isinstance(model, ScriptModel) else model
    return isinstance(inner, TabularServable)


class DataPlane:
    def __init__(
        self,
        config: ServeConfig,
        registry: ModelRegistry | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or ModelRegistry(config)
        self.metrics = metrics or Metrics(None)
        self._requests = itertools.count()  # this worker's invocations, for log_every
        self.events = FreshEvents(
            _events_url(config), config.events_keep, config.events_ttl, config.events_prefix
        )

    # ------------------------------------------------------------ health

    def ping(self) -> tuple[bool, str]:
        return self.registry.ready()

    def execution_parameters(self) -> dict[str, Any]:
        return {
            "MaxConcurrentTransforms": self.config.max_concurrent_transforms,
            "BatchStrategy": self.config.batch_strategy,
            "MaxPayloadInMB": max(1, self.config.max_payload_bytes // MB),
        }

    # ------------------------------------------------------------ inference

    def options(
        self, attributes: dict[str, str], params: dict[str, Any], tabular: bool = False
    ) -> Options:
        """Request options: the body's fields, then custom attributes, then the config."""
        fallback = str(params.get("fallback") or attributes.get("fallback") or self.config.fallback)
        fallback = fallback.strip().lower()
        if fallback not in ("null", "mean", "popularity"):
            raise BadRequest(f"fallback {fallback!r} unknown; use null, mean or popularity")
        return Options(
            fallback=fallback,
            top_k=_top_k(params.get("top_k", attributes.get("top_k"))),
            candidates=params.get("candidates"),
            exclude=params.get("exclude"),
            history=params.get("history"),
            output=_output(params.get("output") or attributes.get("output"), tabular, self.config),
            similar_to=params.get("similar_to"),
            score=_score(params.get("score") or attributes.get("score")),
            fresh_events=self.events.lookup if self.events.enabled else None,
        )

    def invoke(self, request: Invocation) -> Reply:
        """decode -> predict -> encode, with one log line and metrics per request."""
        start = time.perf_counter()
        name, status, rows, null = request.target_model or "-", 500, 0, 0
        try:
            if len(request.body) > self.config.max_payload_bytes:
                raise PayloadTooLarge(
                    f"body of {len(request.body)} bytes exceeds the"
                    f" {self.config.max_payload_bytes}-byte limit"
                )
            name, model = self.registry.get(request.target_model)
            attributes = parse_attributes(request.custom_attributes)
            accept = self._accept(request, model)
            if isinstance(model, ScriptModel):
                body, content_type = model.transform(
                    request.body,
                    request.content_type,
                    accept,
                    self.options(attributes, {}, _is_tabular(model)),
                    request.headers,
                )
                reply = Reply(body, content_type)
            else:
                payload = codecs.decode(request.body, request.content_type)
                if "events" in payload.params:
                    taken = self.take_events(payload)
                    rows = taken["taken"]
                    reply = Reply(json.dumps(taken).encode(), codecs.JSON)
                else:
                    options = self.options(attributes, payload.params, _is_tabular(model))
                    prediction = model.predict(payload, options)
                    rows, null = len(prediction), prediction.counts.get("null", 0)
                    reply = Reply(
                        codecs.encode(prediction, accept), accept, _count_headers(prediction)
                    )
            status = 200
            return reply
        except RecsqlError as exc:
            status = exc.status
            raise
        finally:
            seconds = time.perf_counter() - start
            self.metrics.observe(name, status, rows, null, seconds)
            if status >= 400 or next(self._requests) % self.config.log_every == 0:
                log.info(
                    "invocations model=%s status=%d rows=%d null=%d ms=%.2f inference_id=%s",
                    name,
                    status,
                    rows,
                    null,
                    seconds * 1e3,
                    request.inference_id or "-",
                )

    def post_events(self, body: bytes, content_type: str | None) -> dict[str, int]:
        """POST /events: the `events` body /invocations also takes."""
        payload = codecs.decode(body, content_type)
        if "events" not in payload.params:
            raise BadRequest('POST /events takes {"events": [{"user_id": ..., ...}, ...]}')
        return self.take_events(payload)

    def take_events(self, payload: Payload) -> dict[str, int]:
        """`{"events": [...]}`: store them all, or none (400 naming each bad entry, 503 when
        the store is down); {"taken": events, "users": users}."""
        table = payload.table
        if len(payload.params) > 1 or (isinstance(table, ColumnTable) and table.named):
            raise BadRequest('send "events" alone: {"events": [{"user_id": ..., ...}, ...]}')
        return self.events.take(payload.params["events"])

    def _accept(self, request: Invocation, model: object) -> str:
        if isinstance(model, ScriptModel):
            # Scripts choose their own output types: pass the Accept through,
            # resolving only "missing" and "*/*" to the default.
            accept = (request.accept or "").strip()
            if accept and accept != "*/*":
                return accept
            return self.config.default_accept or request.content_type or codecs.JSON
        return codecs.negotiate(request.accept, request.content_type, self.config.default_accept)

    # ------------------------------------------------------------ multi-model API

    def list_models(self, page_size: int | None, token: str | None) -> dict[str, Any]:
        names = self.registry.names()
        try:
            start = int(token) if token else 0
            size = int(page_size) if page_size else 100
        except ValueError:
            raise BadRequest("next_page_token and page_size must be integers") from None
        if start < 0 or size < 1:
            raise BadRequest("next_page_token must be >= 0 and page_size >= 1")
        page = names[start : start + size]
        out: dict[str, Any] = {"models": [{"modelName": n, "modelUrl": u} for n, u in page]}
        if start + size < len(names):
            out["nextPageToken"] = str(start + size)
        return out

    def describe_model(self, name: str) -> dict[str, Any]:
        resolved, model = self.registry.get(name)
        url = dict(self.registry.names()).get(resolved, "")
        return {"modelName": resolved, "modelUrl": url, **model.describe()}

    def load_model(self, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict) or "model_name" not in doc or "url" not in doc:
            raise BadRequest('send {"model_name": "...", "url": "/path/to/model/dir"}')
        self.registry.add(doc["model_name"], doc["url"])
        return {"status": f"model {doc['model_name']!r} loaded"}

    def unload_model(self, name: str) -> dict[str, Any]:
        self.registry.remove(name)
        return {"status": f"model {name!r} unloaded"}


def _events_url(config: ServeConfig) -> str | None:
    """The event store: RECSQL_EVENTS_URL, else a SQLite file under the state dir the
    workers share, else (no state dir: one process) SQLite in memory; None when off."""
    if config.events_url == "off":
        return None
    if config.events_url:
        return config.events_url
    if config.state_dir is not None:
        return f"sqlite://{Path(config.state_dir).resolve() / 'events.sqlite'}"
    return "sqlite://"


def _count_headers(prediction: Prediction) -> dict[str, str]:
    counts = prediction.counts
    headers = {f"X-Recsql-{k.title()}-Rows": str(v) for k, v in counts.items()}
    # Custom attributes are the one response header SageMaker passes back to the caller.
    headers["X-Amzn-SageMaker-Custom-Attributes"] = ",".join(
        f"{k}_rows={v}" for k, v in counts.items()
    )
    return headers
