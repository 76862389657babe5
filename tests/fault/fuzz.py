"""Requests generated (hypothesis) from the server's own OpenAPI document, sent over HTTP.

Used by tests/fault/test_fuzz.py (a few hundred requests) and bench/fuzz_http.py
(10,000 and more). Every path and method of GET /openapi.json is exercised,
with path parameters, query strings, content types, Accept, SageMaker
headers (custom attributes, target model, inference id), unknown headers,
chunked bodies and bodies of random bytes, random JSON, schema-shaped JSON,
JSON lines, CSV-ish text and (broken, pickled or odd-typed) .npy arrays.
The server must answer every one with a status below 500 and stay up.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.serve.conftest import PRODUCT_IDS, USER_IDS

MODEL_NAMES = ["model", "fz1", "fz2", "nope", "", ".", ".."]
MODEL_URLS = ["fz/model", "fz", "../", "/etc", "/", "file:///etc", "fz/../../etc", "nope/model"]
MEDIA_TYPES = [
    "text/csv",
    "text/csv; charset=utf-8",
    "TEXT/CSV;charset=latin-1",
    "application/json",
    "application/jsonlines",
    "application/x-ndjson",
    "application/x-npy",
    "application/x-recordio-protobuf",
    "text/plain",
    "application/octet-stream",
    "multipart/form-data; boundary=x",
    "*/*",
    "text/*",
    "application/json, text/csv;q=0.5",
    ";",
]
_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_HEADER_TEXT = st.text(_PRINTABLE, max_size=80)
_IDS = [int(x) for x in (*USER_IDS[:5], *PRODUCT_IDS[:5])]
_INTS = st.one_of(
    st.sampled_from(_IDS),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 3),
)


# ---------------------------------------------------------------- bodies

_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    _INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=30,
)
_ID_LISTS = st.one_of(st.lists(_INTS, max_size=12), _JSON)
_PAIRS_DOC = st.fixed_dictionaries(
    {},
    optional={
        "user_id": _ID_LISTS,
        "product_id": _ID_LISTS,
        "customer_id": _ID_LISTS,
        "instances": st.one_of(st.lists(st.lists(_INTS, max_size=3), max_size=8), _JSON),
        "top_k": st.one_of(st.integers(-5, 2000), _JSON_SCALARS),
        "candidates": st.one_of(_ID_LISTS, st.lists(st.lists(_INTS, max_size=5), max_size=3)),
        "exclude": st.one_of(_ID_LISTS, st.lists(st.lists(_INTS, max_size=5), max_size=3)),
        "fallback": st.one_of(st.sampled_from(["null", "mean", "popularity"]), _JSON_SCALARS),
    },
)
_CSV_FIELD = st.one_of(
    _INTS.map(str),
    st.sampled_from(["", '"', '""', " ", "x", "1.5", "-0", "1e3", "NaN", "é", "\t", "\\N", "NULL"]),
    st.text(max_size=6),
)
_CSV_LINE = st.lists(_CSV_FIELD, max_size=5).map(",".join)
_CSV = st.tuples(
    st.lists(_CSV_LINE, max_size=40), st.sampled_from(["\n", "\r\n", "\r"]), st.booleans()
).map(lambda t: (t[1].join(t[0]) + (t[1] if t[2] else "")).encode("utf-8", "surrogatepass"))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class _ExitOnUnpickle:
    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return os._exit, (3,)


def _pickled_exit() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_ExitOnUnpickle()], dtype=object), allow_pickle=True)
    return buf.getvalue()


PICKLED_EXIT_NPY = _pickled_exit()
_NPY_DTYPES = ["<i8", "<i4", ">i8", "<u8", "<f8", "<f4", "|b1", "<U4", "|S3", "<c16"]
_NPY = st.one_of(
    st.tuples(
        st.sampled_from(_NPY_DTYPES),
        st.lists(st.integers(0, 6), min_size=0, max_size=3),
        st.integers(0, 2**32 - 1),
    ).map(lambda t: _npy(np.random.default_rng(t[2]).integers(-5, 10**6, size=t[1]).astype(t[0]))),
    st.tuples(st.integers(1, 120), st.binary(max_size=64)).map(  # cut or corrupted
        lambda t: _npy(np.array([[int(USER_IDS[0]), int(PRODUCT_IDS[0])]]))[: t[0]] + t[1]
    ),
    # An object array whose unpickling would kill the worker: the server must refuse it.
    st.builds(lambda: PICKLED_EXIT_NPY),
)
BODIES = st.one_of(
    st.binary(max_size=2048),
    _CSV,
    _JSON.map(lambda d: json.dumps(d).encode()),
    _PAIRS_DOC.map(lambda d: json.dumps(d).encode()),
    st.lists(st.one_of(_JSON, _PAIRS_DOC), max_size=10).map(
        lambda docs: "\n".join(json.dumps(d) for d in docs).encode()
    ),
    _NPY,
)
_LOAD_DOC = st.one_of(
    st.fixed_dictionaries(
        {
            "model_name": st.one_of(st.sampled_from(MODEL_NAMES), _JSON_SCALARS),
            "url": st.one_of(st.sampled_from(MODEL_URLS), _JSON_SCALARS),
        }
    ).map(lambda d: json.dumps(d).encode()),
    BODIES,
)


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    chunked: bool = False

    def describe(self) -> str:
        body = b"" if self.body is None else self.body
        return (
            f"{self.method} {self.path} {self.headers} chunked={self.chunked} "
            f"body[{len(body)}]={body[:120]!r}"
        )


def _path_value() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(MODEL_NAMES[:4]), st.text(max_size=20)).map(
        lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")
    )


def _fill_path(template: str) -> st.SearchStrategy[str]:
    parts = template.split("/")
    pieces = [_path_value() if p.startswith("{") else st.just(p) for p in parts]
    return st.tuples(*pieces).map("/".join)


def _query() -> st.SearchStrategy[str]:
    keys = st.sampled_from(["page_size", "limit", "next_page_token", "nextPageToken", "x"])
    values = st.one_of(st.integers(-3, 2000).map(str), st.text(max_size=12))
    return st.dictionaries(keys, values, max_size=3).map(lambda q: "?" + urlencode(q) if q else "")


def _headers(with_body: bool) -> st.SearchStrategy[dict[str, str]]:
    attribute = st.tuples(
        st.sampled_from(["top_k", "fallback", "candidates", "exclude", "x", ""]),
        st.one_of(st.integers(-3, 2000).map(str), st.sampled_from(["null", "mean"]), _HEADER_TEXT),
    ).map("=".join)
    optional = {
        "Accept": st.one_of(st.sampled_from(MEDIA_TYPES), _HEADER_TEXT),
        "X-Amzn-SageMaker-Custom-Attributes": st.one_of(
            st.lists(attribute, max_size=4).map(",".join), _HEADER_TEXT
        ),
        "X-Amzn-SageMaker-Target-Model": st.one_of(st.sampled_from(MODEL_NAMES), _HEADER_TEXT),
        "X-Amzn-SageMaker-Inference-Id": _HEADER_TEXT,
        "X-Amzn-SageMaker-Target-Variant": _HEADER_TEXT,
        "X-Fuzz-" + "".join(string.ascii_letters[:5]): _HEADER_TEXT,
    }
    if with_body:
        optional["Content-Type"] = st.one_of(st.sampled_from(MEDIA_TYPES), _HEADER_TEXT)
    return st.fixed_dictionaries({}, optional=optional)


@st.composite
def _request(draw: st.DrawFn, operation: tuple[str, str, dict[str, Any]]) -> FuzzRequest:
    template, method, spec = operation
    path = draw(_fill_path(template))
    if template == "/models" and method == "get":
        path += draw(_query())
    takes_body = method in ("post", "put", "patch") and draw(st.integers(0, 19)) > 0
    if template == "/models" and method == "post":
        body = draw(_LOAD_DOC) if takes_body else None
    elif takes_body or draw(st.integers(0, 9)) == 0:  # sometimes a body where none belongs
        body = draw(BODIES)
    else:
        body = None
    headers = draw(_headers(body is not None))
    if body is not None and "requestBody" in spec and draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(sorted(spec["requestBody"]["content"])))
    chunked = body is not None and draw(st.integers(0, 9)) == 0
    return FuzzRequest(method.upper(), path, headers, body, chunked)


def requests_from_openapi(doc: dict[str, Any]) -> st.SearchStrategy[FuzzRequest]:
    """Any operation of the document, with generated parameters, headers and body."""
    operations = []
    for path, item in sorted(doc["paths"].items()):
        for method, spec in sorted(item.items()):
            # Operations that take a body are where parsing happens: draw them more often.
            operations += [(path, method, spec)] * (4 if "requestBody" in spec else 1)
    return st.sampled_from(operations).flatmap(_request)


# ---------------------------------------------------------------- sending


@dataclass
class FuzzReport:
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # first few >= 500, described
    connection_errors: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + len(self.connection_errors)

    def classes(self) -> dict[str, int]:
        out: Counter[str] = Counter(f"{s // 100}xx" for s in self.statuses.elements())
        if self.connection_errors:
            out["connection error"] = len(self.connection_errors)
        return dict(sorted(out.items()))

    def at_least_500(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)


class Sender:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, url: str, timeout: float = 30) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def send(self, request: FuzzRequest) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            body: Any = request.body
            if request.chunked and body is not None:
                body = iter([body[: len(body) // 2], body[len(body) // 2 :]])
            self.conn.request(
                request.method,
                request.path,
                body,
                request.headers,
                encode_chunked=request.chunked,
            )
            response = self.conn.getresponse()
            data = response.read()
            if response.will_close:
                self.close()
            return response.status, data
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_fuzz(url: str, count: int, random_seed: int = 0) -> FuzzReport:
    """Send `count` generated requests to the server at `url`; never raises on a bad reply."""
    sender = Sender(url)
    sender.conn = http.client.HTTPConnection(sender.host, sender.port, timeout=30)
    sender.conn.request("GET", "/openapi.json")
    doc = json.loads(sender.conn.getresponse().read())
    report = FuzzReport()

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(random_seed)
    @given(requests_from_openapi(doc))
    def one(request: FuzzRequest) -> None:
        template = request.method + " " + request.path.split("?")[0]
        report.by_operation[template.split("/")[1] if "/" in template else template] += 1
        try:
            status, body = sender.send(request)
        except (OSError, http.client.HTTPException) as exc:
            report.connection_errors.append(f"{type(exc).__name__}: {request.describe()}")
            return
        report.statuses[status] += 1
        if status >= 500 and len(report.server_errors) < 20:
            report.server_errors.append(f"{status} {body[:200]!r} <- {request.describe()}")

    try:
        one()
    finally:
        sender.close()
    return report
