"""What flows through the dataplane: request tables in, predictions out.

A `Table` is a decoded request body that has not been typed yet: the model
asks for the columns it needs (`ints` for ids, `values` for tabular features)
and gets one entry per input record plus an `ok` mask. A record that cannot be
read (wrong field count, a field that is not an id) is never dropped or
shifted: it keeps its place with ok=False, and its output is empty/null.

Records of a CSV or JSON-lines body are its lines: split on "\\n" (a "\\r"
before it is dropped), and a final newline does not start another record, so
b"" has 0 records, b"\\n" has 1 (empty) and b"1,2\\n3,4\\n" has 2.
"""

from __future__ import annotations

import csv
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from model.errors import BadRequest
from model.native import count_records

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT_FAST_CHARS = b"0123456789-+,\n"  # a body of only these takes the vectorised path
BAD = object()  # a record that could not be decoded at all (e.g. a bad JSON line)


def split_records(body: bytes) -> list[bytes]:
    """Lines of a body, by the rule in the module docstring."""
    if not body:
        return []
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n")
    lines = body.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def to_int(value: Any) -> int | None:
    """One id from a CSV field or a JSON value; None when it is not an integer id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if _INT64_MIN <= value <= _INT64_MAX else None
    if isinstance(value, (bytes, str)):
        text = value.strip()
        if not text or (b"_" in text if isinstance(text, bytes) else "_" in text):
            return None
        try:
            number = int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                return None
            return to_int(as_float)
        return number if _INT64_MIN <= number <= _INT64_MAX else None
    if isinstance(value, float) and value.is_integer():
        return to_int(int(value))
    return None


def _ints_from_values(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-value conversion: the slow path, used only when the bulk one fails."""
    parsed = [to_int(v) for v in values]
    ok = np.fromiter((p is not None for p in parsed), bool, len(parsed))
    ints = np.fromiter((0 if p is None else p for p in parsed), np.int64, len(parsed))
    return ints, ok


def int_column(values: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An int64 id column and its ok mask, vectorised whenever the input allows."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        if values.dtype.kind == "u" and len(values) and values.max() > _INT64_MAX:
            return _ints_from_values(values.tolist())
        return values.astype(np.int64), np.ones(len(values), bool)
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(values) & (np.floor(values) == values) & (np.abs(values) < 2.0**63)
        return np.where(ok, values, 0).astype(np.int64), ok
    if isinstance(values, list) and all(type(v) is int for v in values):
        try:
            return np.array(values, dtype=np.int64), np.ones(len(values), bool)
        except OverflowError:
            pass
    return _ints_from_values(list(values))


class Table(ABC):
    """A decoded request: `n_rows` records, typed on demand by the model."""

    n_rows: int

    @abstractmethod
    def ints(self, names: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """int64 columns for `names` (positional tables: the first len(names) fields)."""

    @abstractmethod
    def values(self, names: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """str/object columns (str, float or None) for `names`, e.g. tabular features."""


class CsvTable(Table):
    """Header-less CSV: one record per line, exactly len(names) fields per record.

    A record with fewer or more fields is malformed (empty output), never
    re-aligned: guessing which field was extra is how columns shift.
    """

    def __init__(self, body: bytes, lines: list[bytes] | None = None) -> None:
        """A body, split into lines on first use; or, from `subset`, the lines themselves."""
        self.body = body
        if lines is not None:
            self.lines = lines
        self.n_rows = len(lines) if lines is not None else count_records(body)
        # width -> (int64 columns, ok), read-only: each width is parsed once (`ints`)
        self._ints: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}

    @cached_property
    def lines(self) -> list[bytes]:
        return split_records(self.body)

    def subset(self, rows: Sequence[int]) -> CsvTable:
        """The records at `rows`, in that order, as a table of their own."""
        lines = self.lines
        part = CsvTable(b"", [lines[i] for i in rows])
        at = np.asarray(rows, np.int64)
        for width, (columns, ok) in self._ints.items():  # parsed already: slice, not parse
            part._ints[width] = _read_only([c[at] for c in columns], ok[at])
        return part

    def ints(self, names: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Parsed once per width: a batch split between variants reads its users, then each
        variant's model its pairs (read-only arrays: a caller must not write to them)."""
        width = len(names)
        if width not in self._ints:
            self._ints[width] = _read_only(*self._parse_ints(width))
        return self._ints[width]

    def _parse_ints(self, width: int) -> tuple[list[np.ndarray], np.ndarray]:
        fast = self._ints_fast(width)
        if fast is not None:
            return fast
        columns = [np.zeros(self.n_rows, np.int64) for _ in range(width)]
        ok = np.zeros(self.n_rows, bool)
        for row, line in enumerate(self.lines):
            fields = _split_line(line)
            if fields is None or len(fields) != width:
                continue
            parsed = [to_int(f) for f in fields]
            if any(p is None for p in parsed):
                continue
            for column, value in zip(columns, parsed, strict=True):
                column[row] = value
            ok[row] = True
        return columns, ok

    def _ints_fast(self, width: int) -> tuple[list[np.ndarray], np.ndarray] | None:
        """All lines well-formed: split once, convert every field in one pass."""
        n = self.n_rows
        if n == 0:
            return [np.empty(0, np.int64) for _ in range(width)], np.empty(0, bool)
        text = b"\n".join(self.lines)
        if text.translate(None, _INT_FAST_CHARS):
            return None
        buf = np.frombuffer(text, np.uint8)
        is_comma = buf == 44
        if int(is_comma.sum()) != n * (width - 1):
            return None
        if n > 1 and width > 1:
            line_of_byte = np.cumsum(buf == 10)
            per_line = np.bincount(line_of_byte[is_comma], minlength=n)
            if (per_line != width - 1).any():
                return None
        fields = text.replace(b"\n", b",").split(b",")
        try:
            flat = np.fromiter(map(int, fields), np.int64, len(fields))
        except (ValueError, OverflowError):
            return None
        return [flat[j::width] for j in range(width)], np.ones(n, bool)

    def values(self, names: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Per record: the tabular model's compiled decoder (model/native.py) reads the
        plain ones straight from the body, and hands the rest to this path."""
        width = len(names)
        columns = [np.full(self.n_rows, "", dtype=object) for _ in range(width)]
        ok = np.zeros(self.n_rows, bool)
        for row, line in enumerate(self.lines):
            fields = _split_line(line)
            if fields is None or len(fields) != width:
                continue
            for column, value in zip(columns, fields, strict=True):
                column[row] = value.decode("utf-8", errors="replace")
            ok[row] = True
        return columns, ok


def _read_only(columns: list[np.ndarray], ok: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    for array in (*columns, ok):
        array.flags.writeable = False
    return columns, ok


def _split_line(line: bytes) -> list[bytes] | None:
    """Fields of one CSV line (RFC 4180 quoting); None when the quoting is broken."""
    if b'"' not in line:
        return line.split(b",")
    try:
        text = line.decode("utf-8")
        fields = next(csv.reader([text], strict=True), [])
    except (UnicodeDecodeError, csv.Error):
        return None
    return [f.encode() for f in fields]


class ColumnTable(Table):
    """Records from JSON, JSON lines or .npy: named columns or positional rows."""

    def __init__(
        self,
        named: dict[str, Any] | None = None,
        rows: list[Any] | None = None,
        arrays: list[np.ndarray] | None = None,
    ) -> None:
        self.named, self.rows, self.arrays = named, rows, arrays
        if named is not None:
            lengths = {len(v) for v in named.values()}
            if len(lengths) > 1:
                raise BadRequest(f"JSON columns have different lengths: {sorted(lengths)}")
            self.n_rows = lengths.pop() if lengths else 0
        elif rows is not None:
            self.n_rows = len(rows)
        else:
            self.n_rows = len(arrays[0]) if arrays else 0

    def _columns(self, names: Sequence[str]) -> tuple[list[Any], np.ndarray]:
        n = self.n_rows
        if self.named is not None:
            missing = [name for name in names if name not in self.named]
            if missing:
                wanted = ", ".join(f'"{x}": [...]' for x in names)
                raise BadRequest(
                    f"JSON body lacks {', '.join(missing)}; send {{{wanted}}}"
                    ' or {"instances": [[...], ...]}'
                )
            return [self.named[name] for name in names], np.ones(n, bool)
        if self.arrays is not None:
            if len(self.arrays) != len(names):
                raise BadRequest(
                    f"array has {len(self.arrays)} columns; this model needs {len(names)}"
                    f" ({', '.join(names)})"
                )
            return list(self.arrays), np.ones(n, bool)
        return _transpose(self.rows or [], names)

    def ints(self, names: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        raw, ok = self._columns(names)
        columns = []
        for values in raw:
            ints, col_ok = int_column(values)
            columns.append(ints)
            ok &= col_ok
        return columns, ok

    def values(self, names: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        raw, ok = self._columns(names)
        columns = []
        for values in raw:
            column = np.empty(self.n_rows, dtype=object)
            column[:] = ["" if v is None else v for v in list(values)]
            columns.append(column)
        return columns, ok


def _transpose(rows: list[Any], names: Sequence[str]) -> tuple[list[list[Any]], np.ndarray]:
    width = len(names)
    columns: list[list[Any]] = [[None] * len(rows) for _ in range(width)]
    ok = np.zeros(len(rows), bool)
    for r, row in enumerate(rows):
        if isinstance(row, dict):
            row = [row.get(name) for name in names] if all(k in row for k in names) else None
        elif width == 1 and not isinstance(row, (list, tuple)) and row is not BAD:
            row = [row]
        if isinstance(row, (list, tuple)) and len(row) == width:
            for c in range(width):
                columns[c][r] = row[c]
            ok[r] = True
    return columns, ok


@dataclass
class Payload:
    """A decoded body: the records, plus request options found in the body itself."""

    table: Table
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scores:
    """One score per input record; NaN means no score (empty CSV line, JSON null).

    With `labels` (tabular models asked for output=label) each record is also
    given its predicted class: CSV `label,probability`, JSON {"label", "probability"}.
    """

    values: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)  # malformed, unknown, fallback, null
    labels: list[str | None] | None = None  # output=label: the class per record (None: no score)

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Rankings:
    """Top-K answers: per input record, product ids best first and their scores."""

    product_ids: list[np.ndarray]
    scores: list[np.ndarray]
    user_ids: list[int | None]
    counts: dict[str, int] = field(default_factory=dict)
    ranked_by: list[str] | None = None  # history requests: "history" or "popularity" each

    def __len__(self) -> int:
        return len(self.product_ids)


Prediction = Scores | Rankings
