"""Content types: one table of decoders and one of encoders, plus Accept negotiation.

Decoders turn a body into a `Payload` (records not yet typed); encoders turn a
`Scores` or `Rankings` into bytes. Floats are written with 7 significant
digits (float32 precision); a missing score is an empty CSV line or JSON null.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from model.errors import BadRequest, NotAcceptable, UnsupportedContentType, first_line
from model.native import format_scores
from serve.records import (
    BAD,
    ColumnTable,
    CsvTable,
    Payload,
    Prediction,
    Rankings,
    Scores,
    split_records,
)

CSV, JSON, JSONL, NPY = "text/csv", "application/json", "application/jsonlines", "application/x-npy"
_ALIASES = {
    "application/csv": CSV,
    "text/x-csv": CSV,
    "application/jsonl": JSONL,
    "application/x-jsonlines": JSONL,
    "application/json-lines": JSONL,
    "application/x-ndjson": JSONL,
}
_BODY_PARAMS = (
    "top_k",
    "candidates",
    "exclude",
    "fallback",
    "output",
    "history",
    "similar_to",
    "score",
    "events",
)


def media_type(header: str | None) -> str | None:
    """`text/csv; charset=utf-8` -> `text/csv` (lower case, aliases resolved)."""
    if not header:
        return None
    base = header.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base) or None


# ---------------------------------------------------------------- decoders


def decode_csv(body: bytes) -> Payload:
    return Payload(CsvTable(body))


def _load_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"{what} is not valid JSON ({first_line(exc)[:200]})") from None


def decode_json(body: bytes) -> Payload:
    doc = _load_json(body, "body")
    if isinstance(doc, list):
        return Payload(ColumnTable(rows=doc))
    if not isinstance(doc, dict):
        raise BadRequest(
            'JSON body must be {"user_id": [...], "product_id": [...]} or {"instances": [...]}'
        )
    params = {k: doc[k] for k in _BODY_PARAMS if k in doc}
    if "instances" in doc:
        if not isinstance(doc["instances"], list):
            raise BadRequest('"instances" must be a list of records')
        return Payload(ColumnTable(rows=doc["instances"]), params)
    named = {k: v for k, v in doc.items() if k not in _BODY_PARAMS}
    for key, value in named.items():
        if not isinstance(value, list):
            named[key] = [value]  # {"user_id": 5, "top_k": 10}: one record
    return Payload(ColumnTable(named=named), params)


def decode_jsonlines(body: bytes) -> Payload:
    rows: list[Any] = []
    for line in split_records(body):
        try:
            rows.append(json.loads(line) if line.strip() else BAD)
        except (ValueError, RecursionError):
            rows.append(BAD)  # keeps its place; its output line is null
    return Payload(ColumnTable(rows=rows))


def decode_npy(body: bytes) -> Payload:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadRequest(f"body is not a readable .npy array ({first_line(exc)[:200]})") from None
    if (
        not isinstance(array, np.ndarray)
        or array.dtype.kind not in "iuf"
        or array.ndim not in (1, 2)
    ):
        raise BadRequest("x-npy body must be a 1-D or 2-D numeric array (one row per record)")
    columns = [array] if array.ndim == 1 else [array[:, j] for j in range(array.shape[1])]
    return Payload(ColumnTable(arrays=columns))


DECODERS: dict[str, Callable[[bytes], Payload]] = {
    CSV: decode_csv,
    JSON: decode_json,
    JSONL: decode_jsonlines,
    NPY: decode_npy,
}


def decode(body: bytes, content_type: str | None) -> Payload:
    kind = media_type(content_type)
    decoder = DECODERS.get(kind or "")
    if decoder is None:
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise UnsupportedContentType(f"{got} is not supported; send {', '.join(DECODERS)}")
    return decoder(body)


# ---------------------------------------------------------------- encoders


def _numbers(values: np.ndarray, null: str) -> list[str]:
    """Formatted scores; NaN (and inf, which JSON cannot carry) -> `null`."""
    finite = np.isfinite(values)
    if finite.all():
        return [f"{v:.7g}" for v in values.tolist()]
    pairs = zip(values.tolist(), finite.tolist(), strict=True)
    return [f"{v:.7g}" if ok else null for v, ok in pairs]


def _each(values: np.ndarray, sep: str, null: str) -> bytes:
    """Every score as _numbers formats it, each followed by `sep`. From 16 scores on in
    C (model/native.py, the same bytes); below that the call costs more than it saves."""
    if len(values) >= 16:
        return format_scores(values, sep.encode(), null.encode())
    return "".join(text + sep for text in _numbers(values, null)).encode()


def _lines(items: list[str]) -> bytes:
    return ("\n".join(items) + "\n").encode() if items else b""


def _ranking_dict(ranks: Rankings, i: int) -> str:
    ids = ",".join(map(str, ranks.product_ids[i].tolist()))
    scores = ",".join(_numbers(ranks.scores[i], "null"))
    user = "null" if ranks.user_ids[i] is None else str(ranks.user_ids[i])
    basis = f',"ranked_by":"{ranks.ranked_by[i]}"' if ranks.ranked_by else ""
    return f'{{"user_id":{user},"product_ids":[{ids}],"scores":[{scores}]{basis}}}'


def _labelled(scores: Scores, csv: bool) -> list[str]:
    """Per record `label,probability` (CSV) or {"label","probability"} (JSON); ""/null if none."""
    null = "" if csv else "null"
    quote = _csv_field if csv else json.dumps
    texts = {label: quote(label) for label in set(scores.labels or ()) if label is not None}
    pairs = zip(scores.labels or (), _numbers(scores.values, null), strict=True)
    if csv:
        return [null if label is None else f"{texts[label]},{p}" for label, p in pairs]
    return [
        null if label is None else f'{{"label":{texts[label]},"probability":{p}}}'
        for label, p in pairs
    ]


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\r\n') or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


def encode_csv(prediction: Prediction) -> bytes:
    if isinstance(prediction, Scores) and prediction.labels is not None:
        return _lines(_labelled(prediction, csv=True))
    if isinstance(prediction, Scores):
        return _each(prediction.values, "\n", "")
    # One line per user: the product ids, best first, separated by spaces
    # (a CSV line whose first field is the whole list, e.g. for a VARCHAR result).
    return _lines([" ".join(map(str, ids.tolist())) for ids in prediction.product_ids])


def encode_json(prediction: Prediction) -> bytes:
    if isinstance(prediction, Scores) and prediction.labels is not None:
        items = ",".join(_labelled(prediction, csv=False))
    elif isinstance(prediction, Scores):
        return b'{"predictions":[' + _each(prediction.values, ",", "null")[:-1] + b"]}"
    else:
        items = ",".join(_ranking_dict(prediction, i) for i in range(len(prediction)))
    return ('{"predictions":[' + items + "]}").encode()


def encode_jsonlines(prediction: Prediction) -> bytes:
    if isinstance(prediction, Scores) and prediction.labels is not None:
        return _lines(_labelled(prediction, csv=False))
    if isinstance(prediction, Scores):
        return _each(prediction.values, "\n", "null")
    return _lines([_ranking_dict(prediction, i) for i in range(len(prediction.product_ids))])


ENCODERS: dict[str, Callable[[Prediction], bytes]] = {
    CSV: encode_csv,
    JSON: encode_json,
    JSONL: encode_jsonlines,
}


def negotiate(
    accept: str | None,
    content_type: str | None,
    default: str | None,
    offered: tuple[str, ...] = tuple(ENCODERS),
) -> str:
    """The response type for an Accept header.

    Missing or */* -> `default` (SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT); when that
    is unset, answer in the request's own type if we can (Aurora sends CSV and
    reads CSV without saying so), else application/json.
    """
    fallback = media_type(default) or (
        media_type(content_type) if media_type(content_type) in offered else None
    )
    fallback = fallback or (JSON if JSON in offered else offered[0])
    if not accept or not accept.strip():
        return fallback
    choices = []
    for position, part in enumerate(accept.split(",")):
        kind = media_type(part)
        if not kind:
            continue
        quality = 1.0
        for param in part.split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            choices.append((-quality, position, kind))
    for _, _, kind in sorted(choices):
        if kind == "*/*":
            return fallback
        if kind in offered:
            return kind
        if kind.endswith("/*"):
            family = kind[:-1]
            if fallback.startswith(family):
                return fallback
            for candidate in offered:
                if candidate.startswith(family):
                    return candidate
    raise NotAcceptable(f"Accept {accept!r} is not supported; ask for {', '.join(offered)}")


def encode(prediction: Prediction, accept: str) -> bytes:
    return ENCODERS[accept](prediction)
