"""db/http.py: CSV encoding, reply parsing, and the keep-alive pool against a real server."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from db.http import (
    EndpointError,
    EndpointPool,
    Endpoints,
    decode_floats,
    decode_texts,
    encode_rows,
    parse_endpoints,
)
from model.errors import BadRequest
from tests.db.scoring_server import ScoringServer, expected_score


def test_encode_numbers_and_text() -> None:
    assert encode_rows([np.array([1, -2]), np.array([3, 4])]) == b"1,3\n-2,4\n"
    assert encode_rows([["a,b", 'q"x'], [1, None]]) == b'"a,b",1\n"q""x",\n'
    assert encode_rows([np.array([], dtype=np.int64)]) == b""


def test_decode_empty_lines_are_null_and_first_field_counts() -> None:
    out = decode_floats(b"0.5\n\n1e-3\n", 3)
    assert out[0] == 0.5 and np.isnan(out[1]) and out[2] == 0.001
    assert np.isnan(decode_floats(b"\n", 1)).all()
    np.testing.assert_array_equal(decode_floats(b"0.25,x\n1,2\n", 2), [0.25, 1.0])
    np.testing.assert_array_equal(decode_floats(b"1\r\n2\r\n", 2), [1.0, 2.0])
    assert decode_texts(b'"a,""b""",9\nplain\n\n', 3) == ['a,"b"', "plain", None]


def test_decode_refuses_wrong_line_count_and_garbage() -> None:
    with pytest.raises(EndpointError, match="sent 3 rows, reply has 2 lines"):
        decode_floats(b"1\n2\n", 3)
    with pytest.raises(EndpointError, match="line 2 is not a number"):
        decode_floats(b"1\nabc\n", 2)


@given(st.lists(st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)), min_size=1))
def test_decode_round_trip(values: list[float | None]) -> None:
    body = "".join(("" if v is None else repr(v)) + "\n" for v in values).encode()
    out = decode_floats(body, len(values))
    for v, o in zip(values, out, strict=True):
        assert (v is None and np.isnan(o)) or o == v


def test_parse_endpoints() -> None:
    assert parse_endpoints("a=http://h:1, b=http://h:2/x") == {
        "a": "http://h:1",
        "b": "http://h:2/x",
    }
    assert parse_endpoints(["a=http://h:1"]) == {"a": "http://h:1"}
    with pytest.raises(BadRequest, match="NAME=http"):
        parse_endpoints("http://h:1")
    with pytest.raises(BadRequest, match="no URL for endpoint 'other'"):
        Endpoints({"recsql": "http://h:1"}).pool("other")
    with pytest.raises(BadRequest, match="URL must be"):
        EndpointPool("ftp://h/x")


def test_pool_scores_and_reuses_connections() -> None:
    with ScoringServer() as srv:
        pool = EndpointPool(srv.url, target_model="m1.tar.gz")
        for _ in range(5):
            reply = pool.invoke(b"1,2\n-1,3\nnot,a row\n")
            out = decode_floats(reply, 3)
            assert out[0] == pytest.approx(expected_score(1, 2))
            assert np.isnan(out[1:]).all()
        assert srv.requests == 5 and srv.target_models == ["m1.tar.gz"] * 5
        assert srv.connections == 1  # one keep-alive connection served all five
        assert pool.idle_connections == 1
        pool.close()


def test_pool_retries_once_on_a_dropped_keepalive_connection() -> None:
    with ScoringServer(drop_every=1) as srv:  # the server hangs up after every reply
        pool = EndpointPool(srv.url)
        for _ in range(4):
            assert decode_floats(pool.invoke(b"3,4\n"), 1)[0] == pytest.approx(expected_score(3, 4))
        assert srv.requests == 4 and srv.connections == 4


def test_pool_retries_once_when_the_server_hangs_up_mid_request() -> None:
    with ScoringServer(hang_up_every=2) as srv:  # every 2nd request gets no reply
        pool = EndpointPool(srv.url)
        for _ in range(3):
            assert decode_floats(pool.invoke(b"3,4\n"), 1)[0] == pytest.approx(expected_score(3, 4))
        assert srv.requests == 5  # the two lost requests were sent again, once each
    with ScoringServer(hang_up_every=1) as srv:
        with pytest.raises(EndpointError, match="recsql .*Connection aborted"):
            EndpointPool(srv.url, name="recsql").invoke(b"3,4\n")
        assert srv.requests == 2  # once more, not forever


def test_pool_is_thread_safe() -> None:
    with ScoringServer() as srv:
        pool = EndpointPool(srv.url, max_idle=4)
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                for j in range(20):
                    out = decode_floats(pool.invoke(f"{k},{j}\n".encode()), 1)
                    assert out[0] == pytest.approx(expected_score(k, j))
            except BaseException as exc:  # noqa: BLE001 (collected for the assert below)
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors and srv.requests == 160 and pool.idle_connections <= 4


def test_http_error_and_unreachable_endpoint() -> None:
    with ScoringServer(status=500) as srv:
        with pytest.raises(EndpointError, match="HTTP 500: model exploded"):
            EndpointPool(srv.url, name="recsql").invoke(b"1,2\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(EndpointError, match="Connection refused|ConnectionRefused"):
        EndpointPool(f"http://127.0.0.1:{port}", timeout=2).invoke(b"1,2\n")
