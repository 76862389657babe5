"""The dataplane: plain request -> reply functions, testable without a server.

serve/app.py only turns HTTP into these calls. `invoke` is the whole
inference path: pick the model (or each user's production variant), decode ->
predict -> encode, count, log; a shadow variant's turn comes after the reply.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import BadRequest, PayloadTooLarge, RecsqlError, first_line
from model.variants import DEFAULT_VARIANT, Router
from serve import codecs
from serve.config import MB, TABULAR_OUTPUTS, ServeConfig
from serve.events import FreshEvents
from serve.metrics import Metrics
from serve.models import (
    MAX_TOP_K,
    SCORES,
    Options,
    RecommenderModel,
    ServableModel,
    TabularServable,
)
from serve.records import ColumnTable, Payload, Prediction
from serve.registry import ModelRegistry
from serve.scripts import ScriptModel
from serve.split import merge, part_body, request_users, subset_options, subset_table

log = logging.getLogger("recsql.serve")
VARIANT_HEADER = "X-Amzn-Invoked-Production-Variant"
SHADOW_BACKLOG = 64  # shadow requests a worker may have in flight; more are skipped (logged)


@dataclass
class Invocation:
    body: bytes
    content_type: str | None = None
    accept: str | None = None
    custom_attributes: str | None = None
    target_model: str | None = None
    inference_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    target_variant: str | None = None  # X-Amzn-SageMaker-Target-Variant


@dataclass
class Reply:
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    after: Callable[[], None] | None = None  # run once the reply is sent (the shadow's turn)


@dataclass
class _Trace:
    """What one request went to: its model name and, per variant that answered (in order),
    (rows, null rows)."""

    model: str
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)
    shadowed: bool = True  # False: not for the shadow variant (fresh events)

    def header(self) -> str:
        """X-Amzn-Invoked-Production-Variant: the variant; for a batch split between
        variants, theirs joined by commas, in configuration order."""
        return ",".join(self.parts)


def error_headers(exc: BaseException) -> dict[str, str]:
    """Headers an error reply carries: the variant(s) chosen before the request failed."""
    return dict(getattr(exc, "reply_headers", None) or {})


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
        capture: Any = None,
    ) -> None:
        self.config = config
        self.registry = registry or ModelRegistry(config)
        self.metrics = metrics or Metrics(None)
        # serve/capture.py Capture, or any object with its record(variant, inference_id,
        # input, input type, output, output type) that neither raises nor blocks
        self.capture = capture
        self._shadows_running = 0
        production = config.production_variants
        self._default_variant = production[0].name if production else DEFAULT_VARIANT
        self._variant_names = [v.name for v in production] or [DEFAULT_VARIANT]
        self._variant_names += [config.shadow.name] if config.shadow else []
        self._router = Router([v.weight for v in config.variants]) if config.variants else None
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
        """Pick the variant(s), decode -> predict -> encode; one log line and metrics per
        request (per variant that answered part of it)."""
        start = time.perf_counter()
        trace = _Trace(request.target_model or self.config.model_name)
        status = 500
        try:
            if len(request.body) > self.config.max_payload_bytes:
                raise PayloadTooLarge(
                    f"body of {len(request.body)} bytes exceeds the"
                    f" {self.config.max_payload_bytes}-byte limit"
                )
            reply = self._route(request, trace)
            status = 200
            reply.headers[VARIANT_HEADER] = trace.header()
            shadow = self.config.shadow
            if shadow is not None and trace.shadowed and shadow.name not in trace.parts:
                reply.after = partial(self._shadow, request)
            return reply
        except Exception as exc:
            status = exc.status if isinstance(exc, RecsqlError) else 500
            if trace.parts:  # the variant(s) chosen before it failed
                setattr(exc, "reply_headers", {VARIANT_HEADER: trace.header()})  # noqa: B010
            raise
        finally:
            seconds = time.perf_counter() - start
            for variant, (rows, null) in (trace.parts or {"-": (0, 0)}).items():
                if status != 200:
                    rows = null = 0
                self.metrics.observe(trace.model, status, rows, null, seconds, variant)
            rows = sum(r for r, _ in trace.parts.values()) if status == 200 else 0
            null = sum(n for _, n in trace.parts.values()) if status == 200 else 0
            self._log(trace.model, status, rows, null, seconds, request, trace.header() or "-")

    def _log(
        self,
        model: str,
        status: int,
        rows: int,
        null: int,
        seconds: float,
        request: Invocation,
        variant: str,
    ) -> None:
        if status >= 400 or next(self._requests) % self.config.log_every == 0:
            log.info(
                "invocations model=%s status=%d rows=%d null=%d ms=%.2f inference_id=%s variant=%s",
                model,
                status,
                rows,
                null,
                seconds * 1e3,
                request.inference_id or "-",
                variant,
            )

    # ------------------------------------------------------------ variants

    def _route(self, request: Invocation, trace: _Trace) -> Reply:
        """The request's model(s): a target model (multi-model), a target variant, the one
        production variant, or, with several, each user's own (`_split`)."""
        target, default = request.target_variant, self._default_variant
        if target is not None and target not in self._variant_names:
            raise BadRequest(
                f"target variant {target!r} is not a variant of this endpoint;"
                f" variants: {', '.join(self._variant_names)}"
            )
        if request.target_model is not None or (
            not self.config.variants and target in (None, default)
        ):
            trace.model, model = self.registry.get(request.target_model)
            return self._whole(model, request, trace, default)
        variant = target or (default if len(self.config.variants) == 1 else None)
        if variant is not None:
            return self._whole(self.registry.variant(variant), request, trace, variant)
        return self._split(request, trace)

    def _split(self, request: Invocation, trace: _Trace) -> Reply:
        """Several production variants: each row goes to its user's variant (model/
        variants.py) and the answers are put back in order. A request without users
        (history, similar_to, score=similar, events, tabular or script models) and rows
        whose user cannot be read go whole to the variant of the request's inference id,
        else of its body."""
        specs, router = self.config.variants, self._router
        assert router is not None
        models = [self.registry.variant(v.name) for v in specs]

        def keyed() -> int:
            return router.key(
                request.inference_id.encode() if request.inference_id else request.body
            )

        if not all(isinstance(m, RecommenderModel) for m in models):
            i = keyed()
            return self._whole(models[i], request, trace, specs[i].name)
        payload = codecs.decode(request.body, request.content_type)
        attributes = parse_attributes(request.custom_attributes)
        options = self.options(attributes, payload.params)
        users = None if "events" in payload.params else request_users(payload, options)
        if users is None:
            i = keyed()
            return self._whole(models[i], request, trace, specs[i].name, payload)
        ids, ok = users
        index = router.users(ids)
        if not ok.all():
            index[~ok] = keyed()
        if not len(index) or (index == index[0]).all():  # one variant takes it all
            i = int(index[0]) if len(index) else keyed()
            return self._whole(models[i], request, trace, specs[i].name, payload, options)
        chosen = np.unique(index).tolist()
        accept = codecs.negotiate(request.accept, request.content_type, self.config.default_accept)
        parts = []
        for i in chosen:
            rows = np.flatnonzero(index == i)
            sub = Payload(subset_table(payload.table, rows), payload.params)
            sub_options = subset_options(options, rows, len(ids))
            prediction = models[i].predict(sub, sub_options)
            trace.parts[specs[i].name] = (len(prediction), prediction.counts.get("null", 0))
            parts.append((rows, prediction))
            if self.capture is not None:
                body, content_type = part_body(sub, sub_options, request.content_type)
                self._capture(specs[i].name, request, body, content_type, prediction, accept)
        merged = merge(parts, len(ids))
        return Reply(codecs.encode(merged, accept), accept, _count_headers(merged))

    def _whole(
        self,
        model: ServableModel,
        request: Invocation,
        trace: _Trace,
        variant: str,
        payload: Payload | None = None,
        options: Options | None = None,
    ) -> Reply:
        """The whole request to one model: decode -> predict -> encode (or a user script);
        `payload` and `options` when the caller has them already."""
        trace.parts[variant] = (0, 0)
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
            if payload is None:
                payload = codecs.decode(request.body, request.content_type)
            if "events" in payload.params:  # model-independent: taken once, never shadowed
                taken = self.take_events(payload)
                trace.parts[variant] = (taken["taken"], 0)
                trace.shadowed = False
                return Reply(json.dumps(taken).encode(), codecs.JSON)
            if options is None:
                options = self.options(attributes, payload.params, _is_tabular(model))
            prediction = model.predict(payload, options)
            trace.parts[variant] = (len(prediction), prediction.counts.get("null", 0))
            reply = Reply(codecs.encode(prediction, accept), accept, _count_headers(prediction))
        if self.capture is not None:
            self._capture(variant, request, request.body, request.content_type, reply, accept)
        return reply

    def _capture(
        self,
        variant: str,
        request: Invocation,
        body: bytes,
        content_type: str | None,
        output: Reply | Prediction,
        accept: str,
    ) -> None:
        """Hand one variant's input and output to the capture writer (serve/capture.py),
        whose record() neither raises nor blocks. A request without an inference id gets
        one, shared by the parts of a split batch so that a report can join them."""
        if request.inference_id is None:
            request.inference_id = uuid.uuid4().hex
        if isinstance(output, Reply):
            out_body, out_type = output.body, output.content_type
        else:
            out_body, out_type = codecs.encode(output, accept), accept
        assert self.capture is not None
        self.capture.record(
            variant, request.inference_id, body, content_type or "", out_body, out_type
        )

    def _shadow(self, request: Invocation) -> None:
        """The shadow variant scores the request the caller already has its answer to:
        its figures go to /metrics and the log under its own name, never to the caller,
        and nothing it does (slow, failing) reaches the primary path."""
        spec = self.config.shadow
        assert spec is not None
        if self._shadows_running >= SHADOW_BACKLOG:
            log.warning("shadow variant %r: %d behind; one skipped", spec.name, SHADOW_BACKLOG)
            return
        self._shadows_running += 1
        start, status = time.perf_counter(), 500
        trace = _Trace(self.config.model_name)
        try:
            self._whole(self.registry.variant(spec.name), request, trace, spec.name)
            status = 200
        except RecsqlError as exc:
            status = exc.status
            log.warning("shadow variant %r: %s", spec.name, first_line(exc))
        except Exception:
            log.exception("shadow variant %r failed", spec.name)
        finally:
            self._shadows_running -= 1
            seconds = time.perf_counter() - start
            rows, null = trace.parts.get(spec.name, (0, 0))
            self.metrics.observe(trace.model, status, rows, null, seconds, spec.name)
            self._log(trace.model, status, rows, null, seconds, request, spec.name)

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
