"""A request split between production variants: each record to its user's variant
(model/variants.py), the answers put back in request order.

serve/handlers.py decides when to split; these are the pieces: the records' users, one
variant's share of the records and options, its body for data capture, and the merge.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from model.errors import BadRequest, RecsqlError
from serve import codecs
from serve.models import Options, RecommenderModel
from serve.records import BAD, ColumnTable, CsvTable, Payload, Prediction, Rankings, Scores, Table


def request_users(payload: Payload, options: Options) -> tuple[np.ndarray, np.ndarray] | None:
    """Each record's user id and ok mask, read as RecommenderModel reads them (pairs:
    `user_id,product_id`; top-K: `user_id`); None when the records name no user."""
    if options.similar_to is not None or options.history is not None or options.score != "pair":
        return None
    names = ("user_id",) if options.top_k is not None else RecommenderModel.inputs
    (users, *_), ok = payload.table.ints(names)
    return users, ok


def subset_table(table: Table, rows: np.ndarray) -> Table:
    """The records at `rows`, in order, as a table of their own."""
    if isinstance(table, CsvTable):
        return table.subset(rows.tolist())
    assert isinstance(table, ColumnTable)
    picked = rows.tolist()
    if table.named is not None:
        return ColumnTable(named={k: [list(v)[i] for i in picked] for k, v in table.named.items()})
    if table.arrays is not None:
        return ColumnTable(arrays=[a[rows] for a in table.arrays])
    return ColumnTable(rows=[(table.rows or [])[i] for i in picked])


def _per_user(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, list) for v in value)


def subset_options(options: Options, rows: np.ndarray, n_users: int) -> Options:
    """Per-user `candidates`/`exclude` lists (one list per record) cut to `rows`."""
    cut = {}
    for what in ("candidates", "exclude"):
        value = getattr(options, what)
        if _per_user(value):
            if len(value) != n_users:
                raise BadRequest(f'"{what}" has {len(value)} lists for {n_users} users')
            cut[what] = [value[i] for i in rows.tolist()]
    return dataclasses.replace(options, **cut) if cut else options


def part_body(sub: Payload, options: Options, content_type: str | None) -> tuple[bytes, str]:
    """One variant's share of a split request, for data capture: CSV lines as sent,
    anything else as a JSON body of its records and options."""
    table = sub.table
    if isinstance(table, CsvTable):
        return b"".join(line + b"\n" for line in table.lines), content_type or codecs.CSV
    assert isinstance(table, ColumnTable)
    doc: dict[str, Any] = {}
    if table.named is not None:
        doc.update(table.named)
    elif table.arrays is not None:
        doc["instances"] = np.column_stack(table.arrays).tolist()
    else:
        doc["instances"] = [None if r is BAD else r for r in table.rows or []]
    params = dict(sub.params)
    for what in ("candidates", "exclude"):
        value = getattr(options, what)
        if value is not None:
            params[what] = value
    doc.update(params)
    return json.dumps(doc, default=str).encode(), codecs.JSON


def merge(parts: list[tuple[np.ndarray, Prediction]], n: int) -> Prediction:
    """The variants' predictions put back in request order, their counts added up."""
    counts: dict[str, int] = {}
    for _, prediction in parts:
        for key, value in prediction.counts.items():
            counts[key] = counts.get(key, 0) + value
    first = parts[0][1]
    if isinstance(first, Scores) and all(isinstance(p, Scores) for _, p in parts):
        values = np.full(n, np.nan, dtype=first.values.dtype)
        for rows, prediction in parts:
            values[rows] = prediction.values  # type: ignore[union-attr]
        return Scores(values, counts)
    if not all(isinstance(p, Rankings) for _, p in parts):
        raise RecsqlError("the variants answered this request in different shapes")
    ids: list[Any] = [None] * n
    scores: list[Any] = [None] * n
    users: list[Any] = [None] * n
    for rows, prediction in parts:
        assert isinstance(prediction, Rankings)
        for j, row in enumerate(rows.tolist()):
            ids[row], scores[row] = prediction.product_ids[j], prediction.scores[j]
            users[row] = prediction.user_ids[j]
    return Rankings(ids, scores, users, counts)
