"""Calling a scoring endpoint over HTTP: CSV in, one value per line out.

The wire format is SageMaker's `/invocations` with `text/csv`, the same that
Aurora MySQL sends: one header-less line per row, arguments in declaration
order; the reply carries one line per input line, in order, and an empty line
means NULL (unknown id, bad row). When a reply line has several fields only the
first is used, as Aurora does.

`EndpointPool` is urllib3's keep-alive connection pool for one endpoint, safe to
share between threads: DuckDB calls its UDFs from worker threads and
`recsql score` keeps several batches in flight.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import urllib3
from urllib3.exceptions import HTTPError, ProtocolError

from model.errors import BadRequest, RecsqlError

log = logging.getLogger(__name__)

ENV_VAR = "RECSQL_ENDPOINTS"


class EndpointError(RecsqlError):
    """The endpoint could not be reached or gave an unusable answer."""

    status = 502


class EndpointPool:
    """Keep-alive connections to one endpoint URL (urllib3), safe to share between threads.

    `timeout` bounds the connect and each read. A connection that drops before the reply
    (a keep-alive connection the server closed while it sat idle) is retried once on a
    fresh one: scoring is idempotent, so a repeated POST is harmless. Timeouts, refused
    connections and HTTP errors are not retried.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "",
        max_idle: int = 16,
        timeout: float = 60.0,
        target_model: str | None = None,
        custom_attributes: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"endpoint {name or url!r}: URL must be http(s)://host[:port][/path]")
        self.url = url
        self.name = name or url
        self._path = parts.path if parts.path not in ("", "/") else "/invocations"
        self._target_model = target_model
        self._custom_attributes = custom_attributes
        # block=False: more threads than max_idle get extra connections, closed after use
        self._pool = urllib3.connection_from_url(
            url, maxsize=max_idle, block=False, timeout=timeout, retries=False
        )
        self._lock = threading.Lock()
        self.requests = 0  # requests sent, for statistics and tests

    @property
    def idle_connections(self) -> int:
        """Keep-alive connections waiting in the pool (at most max_idle)."""
        return sum(conn is not None for conn in list(self._pool.pool.queue))

    def close(self) -> None:
        self._pool.close()

    def invoke(self, body: bytes, target_model: str | None = None) -> bytes:
        """POST one CSV body; return the reply body. Raises EndpointError."""
        headers = {"Content-Type": "text/csv", "Accept": "text/csv"}
        model = target_model or self._target_model
        if model:
            headers["X-Amzn-SageMaker-Target-Model"] = model
        if self._custom_attributes:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = self._custom_attributes
        response = self._post(body, headers)
        if response.status != 200:
            raise EndpointError(
                f"endpoint {self.name} answered HTTP {response.status}: {_reason(response.data)}"
            )
        return response.data

    def post_json(self, doc: object) -> tuple[int, bytes]:
        """POST `doc` as application/json; return (HTTP status, reply body) whatever the
        status, for callers that read a 4xx (db/events.py). Raises EndpointError only when
        no reply came. A connection dropped before the reply is retried once, as for
        scoring: the usual cause is a keep-alive connection the server closed while idle,
        which never reached the application."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._target_model:
            headers["X-Amzn-SageMaker-Target-Model"] = self._target_model
        response = self._post(json.dumps(doc, separators=(",", ":")).encode(), headers)
        return response.status, response.data

    def _post(self, body: bytes, headers: dict[str, str]) -> Any:
        with self._lock:
            self.requests += 1
        try:
            try:
                return self._pool.urlopen("POST", self._path, body=body, headers=headers)
            except ProtocolError:  # dropped before the reply: once more, on a new connection
                return self._pool.urlopen("POST", self._path, body=body, headers=headers)
        except HTTPError as exc:
            raise EndpointError(f"endpoint {self.name} ({self.url}): {exc}") from exc


def _reason(body: bytes) -> str:
    """The first 200 bytes of an error reply, on one line."""
    return body[:200].decode("utf-8", "replace").strip().replace("\n", " ")


class Endpoints:
    """Endpoint name -> pool. Built once from `name=url` pairs and passed down."""

    def __init__(self, urls: Mapping[str, str], *, timeout: float = 60.0) -> None:
        self.urls = dict(urls)
        self._pools: dict[tuple[str, str | None, str | None], EndpointPool] = {}
        self._timeout = timeout
        self._lock = threading.Lock()

    def pool(
        self, name: str, target_model: str | None = None, custom_attributes: str | None = None
    ) -> EndpointPool:
        """The pool for an endpoint name, the target model and custom attributes its requests
        carry (SqlFunction.target_model, .custom_attributes)."""
        key = (name, target_model, custom_attributes)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                url = self.urls.get(name)
                if url is None:
                    known = ", ".join(sorted(self.urls)) or "none"
                    raise BadRequest(
                        f"no URL for endpoint {name!r} (configured: {known}); pass "
                        f"--endpoint {name}=http://HOST:PORT or set {ENV_VAR}"
                    )
                pool = EndpointPool(
                    url,
                    name=name,
                    timeout=self._timeout,
                    target_model=target_model,
                    custom_attributes=custom_attributes,
                )
                self._pools[key] = pool
            return pool

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


def parse_endpoints(spec: str | Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """`"a=http://h:1,b=http://h:2"` (or a list of `name=url`, or a dict) -> {name: url}."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    urls: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        name, sep, url = item.partition("=")
        if not sep or not name.strip() or not url.strip():
            raise BadRequest(f"bad endpoint {item!r}: expected NAME=http://HOST:PORT")
        urls[name.strip()] = url.strip()
    return urls


# ---------------------------------------------------------------- CSV encode / decode

_WRITE_OPTIONS = pa_csv.WriteOptions(include_header=False, quoting_style="none")
_READ_OPTIONS = pa_csv.ReadOptions(column_names=["value"], use_threads=False)
_PARSE_OPTIONS = pa_csv.ParseOptions(ignore_empty_lines=False)
_CONVERT_OPTIONS = pa_csv.ConvertOptions(column_types={"value": pa.float64()})


def encode_rows(columns: Sequence[Sequence[object]]) -> bytes:
    """Columns of equal length (ints, floats or str) -> header-less CSV bytes."""
    if not columns or not len(columns[0]):
        return b""
    if all(isinstance(c, np.ndarray) and c.dtype.kind in "iuf" for c in columns):
        # Arrow's C++ writer is ~5x faster than str.join for numbers (no quoting needed).
        table = pa.table({f"c{i}": c for i, c in enumerate(columns)})
        sink = pa.BufferOutputStream()
        pa_csv.write_csv(table, sink, _WRITE_OPTIONS)
        return sink.getvalue().to_pybytes()
    texts = [_column_text(col) for col in columns]
    if len(texts) == 1:
        return ("\n".join(texts[0]) + "\n").encode()
    if len(texts) == 2:
        lines = map("{},{}".format, texts[0], texts[1])
    else:
        lines = map(",".join, zip(*texts, strict=True))
    return ("\n".join(lines) + "\n").encode()


def _column_text(col: Sequence[object]) -> list[str]:
    if isinstance(col, np.ndarray) and col.dtype.kind in "iu":
        return list(map(str, col.tolist()))
    out = []
    for value in col.tolist() if isinstance(col, np.ndarray) else col:
        text = "" if value is None else str(value)
        if any(c in text for c in ',"\n\r'):
            text = '"' + text.replace('"', '""') + '"'
        out.append(text)
    return out


def decode_floats(body: bytes, n_rows: int, name: str = "endpoint") -> np.ndarray:
    """Reply body -> float64 array of n_rows; empty line -> NaN (NULL)."""
    if n_rows and b"," not in body:
        try:
            column = pa_csv.read_csv(
                pa.py_buffer(body),
                read_options=_READ_OPTIONS,
                parse_options=_PARSE_OPTIONS,
                convert_options=_CONVERT_OPTIONS,
            ).column(0)
            if len(column) == n_rows:
                return column.to_numpy()
        except pa.ArrowInvalid:
            pass  # the slow path below names the bad line
    lines = _lines(body, n_rows, name)
    if "," in lines[0] or any("," in line for line in lines):
        lines = [line.split(",", 1)[0] for line in lines]
    try:
        return np.array(lines, dtype=np.float64)
    except ValueError:
        pass
    out = np.full(n_rows, np.nan)
    for i, line in enumerate(lines):
        line = line.strip()
        if line:
            try:
                out[i] = float(line)
            except ValueError as exc:
                raise EndpointError(
                    f"{name}: reply line {i + 1} is not a number: {line[:40]!r}"
                ) from exc
    return out


def decode_texts(body: bytes, n_rows: int, name: str = "endpoint") -> list[str | None]:
    """Reply body -> list of str; empty line -> None. Only the first CSV field counts."""
    out: list[str | None] = []
    for line in _lines(body, n_rows, name):
        first = line.split(",", 1)[0] if not line.startswith('"') else _unquote(line)
        out.append(first if first != "" else None)
    return out


def _unquote(line: str) -> str:
    end = 1
    while True:
        end = line.find('"', end)
        if end < 0 or end + 1 >= len(line) or line[end + 1] != '"':
            break
        end += 2
    return line[1 : end if end > 0 else None].replace('""', '"')


def _lines(body: bytes, n_rows: int, name: str) -> list[str]:
    text = body.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    lines = text.split("\n") if n_rows else []
    if n_rows and text == "" and n_rows != 1:
        lines = []
    if len(lines) != n_rows:
        raise EndpointError(f"{name}: sent {n_rows} rows, reply has {len(lines)} lines")
    if lines and lines[0].endswith("\r"):  # CRLF replies
        lines = [line.rstrip("\r") for line in lines]
    return lines
