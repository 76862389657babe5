"""Captured requests -> the recommendations each variant showed to each user.

A capture record (SageMaker data-capture layout, see `iter_capture`) holds one request
body and its reply. Only replies that are recommendation lists count, read from the
reply itself so that every way of asking for a top-K is covered:

- JSON (and JSON lines) `{"predictions": [{"user_id": u, "product_ids": [...]}, ...]}`:
  one list per user; `user_id` null (a `history` visitor or a `similar_to` query) has no
  user to join events to: counted as `no_user` and skipped.
- CSV top-K (`top_k` in the custom attributes): one reply line per request line, the
  product ids separated by spaces, the user in the request line's first field. A CSV
  reply is read as lists only when some line holds more than one id: a `top_k=1` CSV
  reply cannot be told from pair scores and is counted as pair scoring.
- Pair scores (CSV lines or `{"predictions": [0.1, ...]}`): a score is not something a
  user was shown, so these requests are counted as `pair_scoring` and skipped.

Anything else (the events route's `{"taken": ...}`, bodies that do not parse) is counted
as `other`. Nothing here raises on a bad record: a report over a day of traffic must not
stop at one odd line.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import DataError
from serve.capture import iter_records  # the capture writer's own reader

log = logging.getLogger(__name__)


@dataclass
class Recommendations:
    """One row per item shown: its variant, request, time, user and product (numpy
    columns, ready for DuckDB), and how many captured requests were skipped and why."""

    variant: list[str] = field(default_factory=list)
    request: list[int] = field(default_factory=list)  # a running number per captured list
    time_us: list[int] = field(default_factory=list)  # inference time, epoch microseconds
    user_id: list[int] = field(default_factory=list)
    product_id: list[int] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)  # 1 = first shown
    counts: Counter = field(default_factory=Counter)

    def add(self, variant: str, time_us: int, user: int, products: list[int]) -> None:
        self.counts["lists"] += 1
        request = self.counts["lists"]
        for rank, product in enumerate(products, 1):
            self.variant.append(variant)
            self.request.append(request)
            self.time_us.append(time_us)
            self.user_id.append(user)
            self.product_id.append(product)
            self.rank.append(rank)

    def columns(self) -> dict[str, np.ndarray]:
        return {
            "variant": np.asarray(self.variant, dtype=object),
            "req": np.asarray(self.request, np.int64),
            "t_us": np.asarray(self.time_us, np.int64),
            "u": np.asarray(self.user_id, np.int64),
            "p": np.asarray(self.product_id, np.int64),
            "rank": np.asarray(self.rank, np.int32),
        }


def read_recommendations(
    directory: Path, endpoint: str | None = None, variant: str | None = None
) -> Recommendations:
    """Every recommendation list captured under `directory` (see the module docstring)."""
    recs = Recommendations()
    for record in iter_capture(directory, endpoint, variant):
        recs.counts["records"] += 1
        kind = _add_record(recs, record)
        if kind:
            recs.counts[kind] += 1
    if not recs.counts["records"]:
        raise DataError(f"{directory}: no capture records (expected {_LAYOUT})")
    log.info("capture: %s", dict(recs.counts))
    return recs


def _add_record(recs: Recommendations, record: dict[str, Any]) -> str | None:
    """Add one record's lists; the reason it adds none, or None when it adds some."""
    try:
        data = record["captureData"]
        when = _epoch_us(record["eventMetadata"]["inferenceTime"])
        request = _body(data["endpointInput"])
        reply = _body(data["endpointOutput"])
        reply_type = str(data["endpointOutput"].get("observedContentType") or "")
    except (KeyError, TypeError, ValueError, binascii.Error):
        return "unreadable"
    kind = reply_type.split(";", 1)[0].strip().lower()
    if kind == "text/csv":
        lists = _csv_lists(request, reply)
    elif kind in ("application/json", "application/jsonlines", "application/x-jsonlines"):
        lists = _json_lists(reply)
    else:
        return "other"
    if isinstance(lists, str):
        return lists
    variant = str(record.get("variant") or "")
    for user, products in lists:
        if user is None:
            recs.counts["no_user"] += 1
        else:
            recs.add(variant, when, user, products)
    return None


def _body(part: dict[str, Any]) -> bytes:
    """A captured body's bytes: BASE64 is decoded, CSV and JSON are the text itself."""
    data, encoding = part["data"], str(part.get("encoding") or "").upper()
    if encoding == "BASE64":
        return base64.b64decode(data, validate=True)
    return data.encode() if isinstance(data, str) else json.dumps(data).encode()


def _epoch_us(text: str) -> int:
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1e6)


Lists = list[tuple[int | None, list[int]]]


def _json_lists(reply: bytes) -> Lists | str:
    try:
        text = reply.decode()
        if text.lstrip().startswith("{") and '"predictions"' in text:
            items = json.loads(text)["predictions"]
        else:  # JSON lines: one object per line
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError):
        return "other"
    if not isinstance(items, list) or not items:
        return "other"
    if all(isinstance(i, (int, float)) or i is None for i in items):
        return "pair_scoring"
    lists: Lists = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("product_ids"), list):
            return "other"
        if not all(_is_id(p) for p in item["product_ids"]):
            return "other"
        user = item.get("user_id")
        lists.append((user if _is_id(user) else None, list(item["product_ids"])))
    return lists


def _csv_lists(request: bytes, reply: bytes) -> Lists | str:
    try:
        asked = request.decode().splitlines()
        lines = reply.decode().splitlines()
    except UnicodeDecodeError:
        return "other"
    rows = [line.split() for line in lines]
    if not all(all(_int_text(f) for f in row) for row in rows):
        return "pair_scoring"  # a score such as 0.01 (or an empty line: a null score)
    if not any(len(row) > 1 for row in rows) or len(asked) != len(rows):
        return "pair_scoring"
    lists: Lists = []
    for line, row in zip(asked, rows, strict=True):
        first = line.split(",", 1)[0].strip()
        lists.append((int(first) if _int_text(first) else None, [int(f) for f in row]))
    return lists


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_text(text: str) -> bool:
    return text.lstrip("-").isdigit()


# --------------------------------------------------------------------- reading capture

_LAYOUT = "DIR/<endpoint>/<variant>/YYYY/MM/DD/HH/*.jsonl"


def iter_capture(
    directory: Path, endpoint: str | None = None, variant: str | None = None
) -> Iterator[dict[str, Any]]:
    """The capture records under `directory`, each with its "variant" (serve/capture.py
    skips torn lines). A directory holding several endpoints needs `endpoint`, since
    variants of different endpoints may share a name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such capture folder (expected {_LAYOUT})")
    endpoints = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if endpoint is None and len(endpoints) > 1:
        raise DataError(
            f"{directory}: holds endpoints {', '.join(endpoints)}; name one with --endpoint"
        )
    if endpoint is not None and endpoint not in endpoints:
        raise DataError(
            f"{directory}: no endpoint {endpoint!r} (found: {', '.join(endpoints) or 'none'})"
        )
    return iter_records(directory, endpoint=endpoint, variant=variant)
