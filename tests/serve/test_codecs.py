"""Decoding and encoding, without a server: record splitting, id parsing, negotiation."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import BadRequest, NotAcceptable, UnsupportedContentType
from serve import codecs
from serve.records import CsvTable, Rankings, Scores, split_records, to_int

PAIR = ("user_id", "product_id")


@pytest.mark.parametrize(
    ("body", "records"),
    [
        (b"", []),
        (b"\n", [b""]),
        (b"1,2", [b"1,2"]),
        (b"1,2\n", [b"1,2"]),
        (b"1,2\r\n3,4\r\n", [b"1,2", b"3,4"]),
        (b"1,2\n\n3,4", [b"1,2", b"", b"3,4"]),
        (b"1,2\n\n", [b"1,2", b""]),
    ],
)
def test_split_records(body: bytes, records: list[bytes]) -> None:
    assert split_records(body) == records
    assert CsvTable(body).n_rows == len(records)  # counted in C, without splitting


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (b"12", 12),
        (b" -12 ", -12),
        (b"12.0", 12),
        (b"12.5", None),
        (b"1_000", None),
        (b"", None),
        (b"nan", None),
        (b"9223372036854775807", 2**63 - 1),
        (b"9223372036854775808", None),
        (True, None),
        (3.0, 3),
        ("7", 7),
        (None, None),
    ],
)
def test_to_int(value, want) -> None:
    assert to_int(value) == want


def test_fast_and_slow_csv_paths_agree() -> None:
    body = b"1,2\n3,4\n-5,+6\n"
    (u, p), ok = CsvTable(body).ints(PAIR)
    assert u.tolist() == [1, 3, -5] and p.tolist() == [2, 4, 6] and ok.all()
    (u, p), ok = CsvTable(body + b"x,1\n").ints(PAIR)  # one bad line: per-line path
    assert u[:3].tolist() == [1, 3, -5] and p[:3].tolist() == [2, 4, 6]
    assert ok.tolist() == [True, True, True, False]


def test_field_counts_are_checked_per_line() -> None:
    # 4 fields over 2 lines, but 3 + 1: must not be re-aligned into two pairs
    (_, _), ok = CsvTable(b"1,2,3\n4\n").ints(PAIR)
    assert ok.tolist() == [False, False]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=2), max_size=30))
def test_csv_ints_round_trip(pairs: list[list[int]]) -> None:
    body = "".join(f"{u},{p}\n" for u, p in pairs).encode()
    (u, p), ok = CsvTable(body).ints(PAIR)
    assert ok.all() and u.tolist() == [x[0] for x in pairs] and p.tolist() == [x[1] for x in pairs]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_csv_bytes_give_one_output_per_record(body: bytes) -> None:
    table = CsvTable(body)
    assert table.n_rows == len(split_records(body))
    (u, p), ok = table.ints(PAIR)
    assert len(u) == len(p) == len(ok) == len(split_records(body))
    columns, ok = table.values(PAIR)
    assert all(len(c) == len(split_records(body)) for c in columns)
    out = codecs.encode_csv(Scores(np.where(ok, 1.0, np.nan)))
    assert len(split_records(out)) == len(split_records(body))


def test_decode_errors() -> None:
    with pytest.raises(UnsupportedContentType, match="text/csv"):
        codecs.decode(b"", "application/xml")
    with pytest.raises(UnsupportedContentType, match="no Content-Type"):
        codecs.decode(b"", None)
    with pytest.raises(BadRequest, match="not valid JSON"):
        codecs.decode(b"{", "application/json")
    with pytest.raises(BadRequest, match="instances"):
        codecs.decode(b"3", "application/json")
    buf = io.BytesIO()
    np.save(buf, np.array([["a", "b"]]))
    with pytest.raises(BadRequest, match="numeric"):
        codecs.decode(buf.getvalue(), "application/x-npy")


def test_json_shapes() -> None:
    named = codecs.decode(b'{"user_id": 5, "product_id": 6, "top_k": 3}', "application/json")
    assert named.params == {"top_k": 3}
    (u, p), ok = named.table.ints(PAIR)
    assert u.tolist() == [5] and p.tolist() == [6]
    rows = codecs.decode(
        b'[[1, 2], {"user_id": 3, "product_id": 4}, [5], null]', "application/json"
    )
    (u, p), ok = rows.table.ints(PAIR)
    assert ok.tolist() == [True, True, False, False] and u[:2].tolist() == [1, 3]


def test_npy_float_ids_must_be_integral() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([[1.0, 2.0], [1.5, 2.0], [np.nan, 1.0]]))
    (u, p), ok = codecs.decode(buf.getvalue(), "application/x-npy").table.ints(PAIR)
    assert ok.tolist() == [True, False, False] and u[0] == 1


def test_encoders() -> None:
    scores = Scores(np.array([0.5, np.nan, np.inf, 1 / 3], np.float32))
    assert codecs.encode_csv(scores) == b"0.5\n\n\n0.3333333\n"
    assert json.loads(codecs.encode_json(scores)) == {"predictions": [0.5, None, None, 0.3333333]}
    assert codecs.encode_jsonlines(scores) == b"0.5\nnull\nnull\n0.3333333\n"
    ranks = Rankings(
        [np.array([7, 8]), np.array([], np.int64)], [np.array([2.0, 1.0]), np.array([])], [1, None]
    )
    assert codecs.encode_csv(ranks) == b"7 8\n\n"
    assert json.loads(codecs.encode_json(ranks))["predictions"][1] == {
        "user_id": None,
        "product_ids": [],
        "scores": [],
    }


@pytest.mark.parametrize(
    ("accept", "content_type", "default", "want"),
    [
        (None, "text/csv", None, "text/csv"),
        ("*/*", "text/csv; charset=utf-8", None, "text/csv"),
        (None, "text/csv", "application/json", "application/json"),
        ("*/*", "application/x-npy", None, "application/json"),
        (
            "application/xml, text/csv;q=0.5, application/json;q=0.8",
            "text/csv",
            None,
            "application/json",
        ),
        ("application/jsonl", "text/csv", None, "application/jsonlines"),
        ("text/csv;q=0, application/*", "text/csv", None, "application/json"),
    ],
)
def test_negotiate(accept, content_type, default, want) -> None:
    assert codecs.negotiate(accept, content_type, default) == want


def test_negotiate_refuses() -> None:
    with pytest.raises(NotAcceptable, match="application/xml"):
        codecs.negotiate("application/xml", "text/csv", None)
