"""DuckDB: the SQL functions as vectorised Python UDFs, one HTTP request per chunk.

DuckDB hands an Arrow UDF up to 2,048 rows at a time, from several worker
threads; each chunk becomes one `text/csv` request to the function's endpoint
(the way Aurora batches rows), through a shared keep-alive pool.

NULL policy:
- a row with a NULL argument is not sent and scores NULL;
- a row the endpoint cannot score (unknown id, bad row: an empty reply line) is NULL;
- a failed request (endpoint down, HTTP error, wrong number of reply lines)
  fails the query with a one-line message (`on_error="error"`, the default), or,
  with `on_error="null"`, makes that chunk's rows NULL and logs a warning.

Endpoint names resolve to URLs through the `Endpoints` the caller passes
(`--endpoint recsql=http://127.0.0.1:8080` or RECSQL_ENDPOINTS): SQL never holds a URL.

Events functions (db/functions.py EVENT_FUNCTIONS, e.g. `record_event(user_id, product_id,
event_type, event_time)`) send each chunk as one `{"events": [...]}` request instead and
return INTEGER per row: 1 taken, 0 rejected by the server (a bad row: split out of its
chunk, the good rows are still taken, see db/events.py), NULL not sent (NULL id or
product). event_time is a TIMESTAMP, read as UTC (cast strings: `event_time::TIMESTAMP`).
Use them where every row is evaluated once: `SELECT record_event(...) FROM t` or `INSERT
INTO log SELECT ..., record_event(...) FROM t` (a LIMIT or a filter on the result may
still send rows it drops). Chunks may run on several threads at once, so the order of
events across chunks is not kept: back-fill history with `recsql events push`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from db.events import epoch_seconds, event_entries, send_events
from db.functions import DEFAULT_FUNCTIONS, SqlFunction
from db.http import EndpointError, EndpointPool, Endpoints, decode_floats, decode_texts, encode_rows
from model.errors import BadRequest

log = logging.getLogger(__name__)

ON_ERROR = ("error", "null")
_ARROW_RETURN = {
    "FLOAT": pa.float32(),
    "DOUBLE": pa.float64(),
    "DECIMAL": pa.float64(),
    "BIGINT": pa.int64(),
    "INT": pa.int32(),
    "INTEGER": pa.int32(),
}


def duckdb_type(sql_type: str) -> str:
    """A SqlFunction type -> the DuckDB type the UDF is declared with."""
    base = sql_type.split("(")[0].strip().upper()
    if base in ("VARCHAR", "TEXT"):
        return "VARCHAR"
    if base == "DECIMAL":
        return "DOUBLE"  # scores travel as text anyway; DOUBLE keeps the UDF simple
    if base == "INT":
        return "INTEGER"
    return base


def install_duckdb_functions(
    con: duckdb.DuckDBPyConnection,
    endpoints: Endpoints | Mapping[str, str],
    functions: Iterable[SqlFunction] = DEFAULT_FUNCTIONS,
    *,
    on_error: str = "error",
) -> list[str]:
    """Register each function on `con` (replacing an earlier registration). Returns names."""
    if on_error not in ON_ERROR:
        raise BadRequest(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    if not isinstance(endpoints, Endpoints):
        endpoints = Endpoints(endpoints)
    names = []
    for fn in functions:
        # fails now if no URL is configured
        pool = endpoints.pool(fn.endpoint, fn.target_model, fn.custom_attributes)
        try:
            con.remove_function(fn.name)
        except (duckdb.InvalidInputException, duckdb.CatalogException):
            pass  # not registered yet
        events = fn.score == "events"
        con.create_function(
            fn.name,
            make_event_udf(fn, pool, on_error) if events else make_udf(fn, pool, on_error),
            _EVENT_TYPES if events else [duckdb_type(a.sql_type) for a in fn.args],
            "INTEGER" if events else duckdb_type(fn.returns),
            type="arrow",
            null_handling="special",  # we see NULLs and leave those rows out of the request
            side_effects=True,  # never constant-fold or cache: the model behind it can change
        )
        names.append(fn.name)
    return names


_EVENT_TYPES = ["BIGINT", "BIGINT", "VARCHAR", "TIMESTAMP"]


def make_event_udf(
    fn: SqlFunction, pool: EndpointPool, on_error: str = "error", max_rows: int | None = None
) -> Callable[..., pa.Array]:
    """The Arrow UDF of an events function: chunk of (id, product, type, time) -> INTEGER
    verdicts (1 taken, 0 rejected, NULL not sent). On a failed request, on_error "error"
    fails the query; "null" leaves the rows not yet taken NULL and logs a warning."""
    max_rows = max_rows or fn.max_batch_size
    key = fn.event_key or "user_id"

    def udf(ids: pa.Array, products: pa.Array, kinds: pa.Array, times: pa.Array) -> pa.Array:
        entries = event_entries(
            key, ids.to_pylist(), products.to_pylist(), kinds.to_pylist(), epoch_seconds(times)
        )
        rows = [(i, e) for i, e in enumerate(entries) if e is not None]  # NULL ids: not sent
        out: list[int | None] = [None] * len(entries)
        try:
            for start in range(0, len(rows), max_rows):
                part = rows[start : start + max_rows]
                verdicts = send_events(pool, [e for _, e in part])
                for (i, _), taken in zip(part, verdicts.taken, strict=True):
                    out[i] = taken
                if verdicts.reasons:
                    log.warning(
                        "%s: %d rows rejected: %s",
                        fn.name,
                        verdicts.taken.count(0),
                        verdicts.reasons[0],
                    )
        except EndpointError as exc:
            if on_error == "error":
                raise EndpointError(f"{fn.name}: {exc}") from exc
            log.warning("%s: %s; %d rows left NULL", fn.name, exc, out.count(None))
        return pa.array(out, type=pa.int32())

    udf.__name__ = fn.name
    return udf


def make_udf(
    fn: SqlFunction, pool: EndpointPool, on_error: str = "error", max_rows: int | None = None
) -> Callable[..., pa.Array]:
    """The Arrow UDF for `fn`: chunk of argument arrays -> array of results.

    At most `max_rows` (default: the function's max_batch_size) rows go in one request.
    """
    max_rows = max_rows or fn.max_batch_size
    text_result = fn.returns_text
    arrow_type = pa.string() if text_result else _ARROW_RETURN[duckdb_type(fn.returns)]

    def udf(*arrays: pa.Array) -> pa.Array:
        n = len(arrays[0])
        valid = _valid_rows(arrays)
        columns = [_as_column(a, valid) for a in arrays]
        sent = len(columns[0])
        try:
            values = _score(pool, columns, sent, text_result, max_rows)
        except EndpointError as exc:
            if on_error == "error":
                raise EndpointError(f"{fn.name}: {exc}") from exc
            log.warning("%s: %s; %d rows set to NULL", fn.name, exc, n)
            return pa.nulls(n, arrow_type)
        return _assemble(values, valid, n, arrow_type, text_result)

    udf.__name__ = fn.name
    # DuckDB checks the Python signature against the declared argument count.
    udf.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_ONLY) for a in fn.args]
    )
    return udf


def _valid_rows(arrays: tuple[pa.Array, ...]) -> np.ndarray | None:
    """Boolean mask of rows with no NULL argument, or None when every row is complete."""
    if not any(a.null_count for a in arrays):
        return None
    mask = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        if a.null_count:
            mask &= pc.is_valid(a).to_numpy(zero_copy_only=False)
    return mask


def _as_column(array: pa.Array, valid: np.ndarray | None) -> np.ndarray | list:
    if valid is not None:
        array = array.filter(pa.array(valid))
    if pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        return array.to_numpy(zero_copy_only=False)
    return array.to_pylist()


def _score(
    pool: EndpointPool, columns: list, sent: int, text_result: bool, max_rows: int
) -> np.ndarray | list:
    if sent == 0:
        return [] if text_result else np.empty(0)
    parts = []
    for start in range(0, sent, max_rows):  # DuckDB chunks (2,048 rows) rarely exceed it
        stop = min(start + max_rows, sent)
        reply = pool.invoke(encode_rows([c[start:stop] for c in columns]))
        decode = decode_texts if text_result else decode_floats
        parts.append(decode(reply, stop - start, pool.name))
    if text_result:
        return [v for part in parts for v in part]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _assemble(
    values: np.ndarray | list,
    valid: np.ndarray | None,
    n: int,
    arrow_type: pa.DataType,
    text_result: bool,
) -> pa.Array:
    if text_result:
        if valid is None:
            return pa.array(values, type=arrow_type)
        out: list[str | None] = [None] * n
        for i, v in zip(np.flatnonzero(valid).tolist(), values, strict=True):
            out[i] = v
        return pa.array(out, type=arrow_type)
    if valid is None:
        full = values
    else:
        full = np.full(n, np.nan)
        full[valid] = values
    nulls = np.isnan(full)
    if pa.types.is_integer(arrow_type):
        full = np.where(nulls, 0, full).astype(arrow_type.to_pandas_dtype())
    return pa.array(full, type=arrow_type, mask=nulls if nulls.any() else None, from_pandas=False)
