"""In-server scoring on MariaDB/MySQL: the loadable function reads a vectors file.

Against the real server (RECSQL_TEST_MYSQL_URL) and, for parity, the real
`recsql serve` endpoint on loopback: the same artifact must give the same scores
through both paths, including unknown ids, NULLs and the fallback policies, and
for history models, whose repeat bonus the file carries too.
Allow-list names here start with `rvec-` so that concurrent test runs on a
shared server do not collide with other tests' entries.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pymysql
import pytest

from db.functions import Argument, SqlFunction
from db.load import mysql_connect
from db.mysql_udf import (
    Endpoint,
    Vectors,
    build_udf,
    create_functions,
    install_in_server,
    install_udf,
    write_allow_list,
)
from db.vectors import write_vectors
from model import load_model, save_mfblock
from model.history import Bonus
from model.recommender import Recommender, relu_tower
from serve.models import Options, RecommenderModel
from serve.records import CsvTable, Payload
from tests.serve.conftest import random_weights, running

pytestmark = pytest.mark.mysql

USERS = np.arange(300, dtype=np.int64) * 7 + 10_000
ITEMS = np.arange(500, dtype=np.int64) * 3 + 500_000
SIGNAL_ERRNO = 1644
PAIR = (Argument("user_id", "BIGINT"), Argument("product_id", "BIGINT"))


def make_model(path: Path, seed: int, softmax: bool) -> Path:
    """A random MFBlock artifact: softmax (probabilities, the default kind) or mse (raw dot)."""
    weights = random_weights(seed, len(USERS), len(ITEMS))
    if not softmax:
        return save_mfblock(path, weights, USERS, ITEMS, global_mean=0.25)
    temperature = 0.5
    users = relu_tower(
        weights["user_embeddings.weight"], weights["dense_user.weight"], weights["dense_user.bias"]
    ) / np.float32(temperature)
    items = relu_tower(
        weights["item_embeddings.weight"], weights["dense_item.weight"], weights["dense_item.bias"]
    )
    logits = users @ items.T
    top = logits.max(1, keepdims=True)
    weights["user_log_normalizer"] = (top[:, 0] + np.log(np.exp(logits - top).sum(1))).astype(
        np.float32
    )
    score = {"kind": "probability", "temperature": temperature}
    return save_mfblock(path, weights, USERS, ITEMS, global_mean=0.25, score=score)


def with_bonus(rec: Recommender, seed: int) -> Recommender:
    """`rec` as a history model scores: 0 to 12 products per user row get a repeat bonus
    on their logit (every 7th user none), and a probability model's log normaliser is
    recomputed over dot + bonus so that each user's probabilities still sum to 1."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 13, len(USERS))
    counts[::7] = 0
    rows = [np.sort(rng.choice(len(ITEMS), c, replace=False)) for c in counts]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    bonus = Bonus(
        indptr,
        np.concatenate(rows).astype(np.int32),
        rng.normal(0.5, 2.0, int(counts.sum())).astype(np.float32),
    )
    normalizer = None
    if rec.probabilities:
        logits = (rec.user_vectors @ rec.item_vectors.T).astype(np.float64)
        np.add.at(logits, (np.repeat(np.arange(len(USERS)), counts), bonus.items), bonus.values)
        top = logits.max(1, keepdims=True)
        normalizer = (top[:, 0] + np.log(np.exp(logits - top).sum(1))).astype(np.float32)
    return dataclasses.replace(rec, bonus=bonus, user_log_normalizer=normalizer)


def bonus_pairs(rec: Recommender) -> tuple[np.ndarray, np.ndarray]:
    """Every (user id, product id) pair the model's bonus names."""
    counts = np.diff(rec.bonus.indptr)
    return np.repeat(USERS, counts), ITEMS[rec.bonus.items]


def endpoint_scores(rec: Recommender, users: np.ndarray, items: np.ndarray, fallback: str):
    """What the endpoint answers for these pairs (serve's handler, not a re-implementation)."""
    body = "".join(f"{u},{i}\n" for u, i in zip(users, items, strict=True)).encode()
    scores = RecommenderModel(rec).predict(Payload(CsvTable(body)), Options(fallback=fallback))
    return scores.values


def sample_pairs(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Known pairs, plus unknown users, unknown items and both unknown."""
    rng = np.random.default_rng(seed)
    users = rng.choice(USERS, n)
    items = rng.choice(ITEMS, n)
    k = n // 10
    users[:k] = rng.integers(1, 9_000, k)  # unknown users
    items[k : 2 * k] = rng.integers(1, 400_000, k)  # unknown items
    users[2 * k : 2 * k + 5] = -1
    items[2 * k : 2 * k + 5] = 2**63 - 1
    return users, items


def query(conn: pymysql.Connection, sql: str, args: object = None) -> list[tuple]:
    """Rows, with the loadable functions' binary strings decoded."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    return [tuple(v.decode() if isinstance(v, bytes) else v for v in row) for row in rows]


def near(got: float, want: float) -> bool:
    """Within 1e-6 (relative above 1: a raw dot product's float32 ulp is larger)."""
    return abs(got - want) <= 1e-6 * max(1.0, abs(want))


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """float32 parity: NULL exactly where the endpoint gives NULL, values within 1e-6
    (relative for raw dot products above 1, whose float32 ulp is larger than that)."""
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.all(np.abs(got[ok] - want[ok]) <= 1e-6 * np.maximum(1.0, np.abs(want[ok])))


@pytest.fixture(scope="module")
def vec_dir() -> Iterator[Path]:
    """A directory the server's user can read (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="recsql-vec-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {
        "softmax": make_model(base / "softmax", 1, True),
        "softmax2": make_model(base / "softmax2", 2, True),
        "mse": make_model(base / "mse", 1, False),
    }


@pytest.fixture(scope="module")
def allow_list(mysql_url: str) -> Iterator[tuple[Path, list[str]]]:
    """The UDF installed; yields the allow-list path and a list of names to remove after."""
    conn = mysql_connect(mysql_url)
    names: list[str] = []
    try:
        path = install_udf(conn, {}, [], so_path=build_udf())
        yield path, names
        write_allow_list(path, {}, remove=names)
    finally:
        conn.close()


@pytest.fixture
def entry(allow_list: tuple[Path, list[str]], vec_dir: Path):
    """entry(rec_or_None, fallback="null", max_mb=None) -> (name, vectors path): a fresh
    allow-list name mapped to a fresh vectors file."""
    path, names = allow_list

    def make(rec: Recommender | None, fallback: str = "null", max_mb: int | None = None):
        name = f"rvec-{uuid.uuid4().hex[:10]}"
        vectors = vec_dir / f"{name}.vectors"
        if rec is not None:
            write_vectors(rec, vectors, fallback)
        names.append(name)
        write_allow_list(path, {name: Vectors(vectors, max_mb)})
        return name, vectors

    return make


def in_server(conn: pymysql.Connection, name: str, users, items) -> np.ndarray:
    query(conn, "CREATE TEMPORARY TABLE IF NOT EXISTS rvec_pairs (k INT, u BIGINT, i BIGINT)")
    query(conn, "DELETE FROM rvec_pairs")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO rvec_pairs VALUES (%s, %s, %s)",
            [(k, int(u), int(i)) for k, (u, i) in enumerate(zip(users, items, strict=True))],
        )
    rows = query(conn, "SELECT recsql_invoke(%s, u, i) FROM rvec_pairs ORDER BY k", (name,))
    return np.array([np.nan if r[0] is None else r[0] for r in rows], dtype=np.float64)


# --------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", ["softmax", "mse"])
@pytest.mark.parametrize("fallback", ["null", "mean", "popularity"])
def test_scores_equal_the_endpoint(mysql_conn, entry, models, kind, fallback) -> None:
    rec = load_model(models[kind])
    name, _ = entry(rec, fallback)
    users, items = sample_pairs(2000)
    got = in_server(mysql_conn, name, users, items)
    want = endpoint_scores(rec, users, items, fallback).astype(np.float64)
    assert_close(got, want)
    assert np.isnan(got).sum() == (405 if fallback == "null" else 0)  # see sample_pairs
    if kind == "softmax":
        assert np.nanmax(got) <= 1.0 and np.nanmin(got) >= 0.0


@pytest.mark.parametrize("kind", ["softmax", "mse"])
@pytest.mark.parametrize("fallback", ["null", "mean", "popularity"])
def test_history_model_scores_equal_the_endpoint(mysql_conn, entry, models, kind, fallback) -> None:
    """dot + bonus, then the probability: every pair the bonus names, random pairs (mostly
    without one) and unknown users and products, as the endpoint scores them."""
    rec = with_bonus(load_model(models[kind]), seed=11)
    name, _ = entry(rec, fallback)
    named_users, named_items = bonus_pairs(rec)
    users, items = sample_pairs(2000)
    users, items = np.concatenate([named_users, users]), np.concatenate([named_items, items])
    got = in_server(mysql_conn, name, users, items)
    want = endpoint_scores(rec, users, items, fallback).astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    # relative error within 1e-5; raw dot products near 0 within a float32 ulp of their terms
    atol = 1e-12 if rec.probabilities else 1e-6
    assert np.allclose(got[ok], want[ok], rtol=1e-5, atol=atol)
    assert np.isnan(got).sum() == (405 if fallback == "null" else 0)  # see sample_pairs
    # the bonus decides those scores: without it, each named pair would score otherwise
    plain = endpoint_scores(dataclasses.replace(rec, bonus=None), users, items, fallback)
    named = np.arange(len(users)) < len(named_users)
    assert named.sum() > 1000 and (~named & ok).sum() > 1500
    assert np.all(np.abs(got[named] - plain[named]) > 1e-5 * np.abs(plain[named]))
    if kind == "softmax":
        assert np.nanmax(got) <= 1.0 and np.nanmin(got) >= 0.0


def _as_version_1(data: bytes) -> bytes:
    """A file without a bonus as recsql wrote it before the bonus: version 1, six sections
    (the last one ending the file), header bytes 96..128 and 224..256 zero."""
    offset, length = struct.unpack_from("<QQ", data, 128 + 16 * 5)
    out = bytearray(data[: offset + length])
    struct.pack_into("<I", out, 8, 1)
    struct.pack_into("<Q", out, 16, len(out))
    out[96:128], out[224:256] = bytes(32), bytes(32)
    struct.pack_into("<I", out, 12, zlib.crc32(bytes(out[16:])))
    return bytes(out)


def test_a_version_1_file_still_scores(mysql_conn, entry, models) -> None:
    """Files an older recsql wrote (version 1: no bonus) score as before."""
    rec = load_model(models["softmax"])
    name, path = entry(rec, "popularity")
    users, items = sample_pairs(300, seed=4)
    now = in_server(mysql_conn, name, users, items)
    old = path.with_suffix(".tmp")
    old.write_bytes(_as_version_1(path.read_bytes()))
    old.chmod(0o644)
    os.replace(old, path)
    assert struct.unpack_from("<I", path.read_bytes(), 8) == (1,)
    rows = query(mysql_conn, "SELECT recsql_invoke(%s, 1, 2), recsql_last_error()", (name,))
    assert rows[0][1] is None, rows
    assert np.array_equal(in_server(mysql_conn, name, users, items), now, equal_nan=True)


def test_in_server_equals_the_http_path(mysql_url, mysql_conn, entry, models, tmp_path) -> None:
    """The same wrapper, once over HTTP to a real `recsql serve`, once in-server."""
    rec = load_model(models["softmax"])
    vec_name, _ = entry(rec)
    users, items = sample_pairs(500, seed=5)
    with running(["--model-dir", str(models["softmax"]), "--workers", "1"], tmp_path) as srv:
        http_name = f"rvec-http-{uuid.uuid4().hex[:8]}"
        path = install_udf(mysql_conn, {http_name: Endpoint(srv.url)}, [], so_path=build_udf())
        try:
            over_http = in_server(mysql_conn, http_name, users, items)
        finally:
            write_allow_list(path, {}, remove=[http_name])
    local = in_server(mysql_conn, vec_name, users, items)
    assert np.array_equal(np.isnan(local), np.isnan(over_http))
    ok = ~np.isnan(local)
    assert ok.sum() > 300
    # the endpoint prints 7 significant digits (%.7g)
    assert np.allclose(local[ok], over_http[ok], rtol=1e-6, atol=1e-9)


def test_wrappers_null_and_strict_policies(mysql_conn, fresh_database, entry, models) -> None:
    rec = load_model(models["softmax"])
    name, _ = entry(rec)
    fn = SqlFunction("will_purchase", PAIR, "FLOAT", endpoint=name)
    mysql_conn.select_db(fresh_database)
    create_functions(mysql_conn, [fn])
    u, i = int(USERS[3]), int(ITEMS[7])
    want = float(rec.score(np.array([u]), np.array([i]))[0])
    ((got, strict),) = query(
        mysql_conn,
        "SELECT CAST(will_purchase(%s, %s) AS DOUBLE), "
        "CAST(will_purchase_strict(%s, %s) AS DOUBLE)",
        (u, i, u, i),
    )
    assert near(got, want) and near(strict, want)
    # unknown ids and NULL arguments: NULL, and not an error (the endpoint's policy)
    rows = query(
        mysql_conn,
        "SELECT will_purchase(1, %s), will_purchase_strict(%s, 1), will_purchase(NULL, %s), "
        "will_purchase_strict(%s, NULL), recsql_last_error()",
        (i, u, i, u),
    )
    assert rows == [(None, None, None, None, None)]
    # an id that is not a 64-bit integer: NULL with the reason; strict raises it
    rows = query(mysql_conn, "SELECT recsql_invoke(%s, 'abc', 1), recsql_last_error()", (name,))
    assert rows[0][0] is None and "user_id is not a 64-bit integer id" in rows[0][1]
    rows = query(
        mysql_conn,
        "SELECT recsql_invoke(%s, %s, 1e30), recsql_invoke(%s, %s, 2.5)",
        (name, u, name, u),
    )
    assert rows == [(None, None)]
    # numbers and text that are whole ids score as the ids do
    rows = query(
        mysql_conn,
        "SELECT recsql_invoke(%s, %s, %s), recsql_invoke(%s, ' 10021 ', %s)",
        (name, f"{u}.0", str(i), name, float(i)),
    )
    assert near(rows[0][0], want)
    assert near(rows[0][1], float(rec.score(np.array([10021]), np.array([i]))[0]))
    # three arguments is not a pair
    rows = query(mysql_conn, "SELECT recsql_invoke(%s, 1, 2, 3), recsql_last_error()", (name,))
    assert rows[0][0] is None and "scores (user_id, product_id)" in rows[0][1]
    text = query(mysql_conn, "SELECT recsql_invoke_str(%s, %s, %s)", (name, u, i))[0][0]
    assert text == f"{want:.7g}"


# --------------------------------------------------------- named, never a path


def test_sql_names_the_model_never_a_path(mysql_url, mysql_conn, entry, models) -> None:
    rec = load_model(models["mse"])
    name, vectors = entry(rec)
    user = f"rvec_{uuid.uuid4().hex[:8]}"
    hosts = ("%", "localhost")  # 'localhost' too: it outranks an anonymous ''@'localhost'
    for host in hosts:
        query(mysql_conn, f"CREATE USER '{user}'@'{host}' IDENTIFIED BY 'pw'")
        query(mysql_conn, f"GRANT SELECT ON test.* TO '{user}'@'{host}'")
    try:
        host_port = mysql_url.split("@", 1)[1].split("/", 1)[0]
        limited = mysql_connect(f"mysql://{user}:pw@{host_port}/test")
        try:
            u, i = int(USERS[0]), int(ITEMS[0])
            assert (
                query(limited, "SELECT recsql_invoke(%s, %s, %s)", (name, u, i))[0][0] is not None
            )
            for attempt in (str(vectors), f"file://{vectors}", "/etc/passwd", "../" + name):
                rows = query(
                    limited, "SELECT recsql_invoke(%s, 1, 2), recsql_last_error()", (attempt,)
                )
                assert rows[0][0] is None
                assert "not in the allow-list" in rows[0][1] or "unknown" in rows[0][1]
            # the limited user cannot register functions or reach the allow-list file
            with pytest.raises(pymysql.MySQLError):
                query(limited, "CREATE FUNCTION x RETURNS REAL SONAME 'recsql_udf.so'")
        finally:
            limited.close()
    finally:
        for host in hosts:
            query(mysql_conn, f"DROP USER '{user}'@'{host}'")


# ----------------------------------------------------------------- bad files


def _alive(conn: pymysql.Connection) -> None:
    assert query(conn, "SELECT 1") == [(1,)]


def _fails_with(conn, name: str, reason: str) -> None:
    rows = query(
        conn,
        "SELECT recsql_invoke(%s, %s, %s), recsql_last_error()",
        (name, int(USERS[0]), int(ITEMS[0])),
    )
    assert rows[0][0] is None and reason in (rows[0][1] or ""), rows
    _alive(conn)


def test_bad_files_give_null_and_a_reason(mysql_conn, entry, models) -> None:
    rec = load_model(models["softmax"])
    name, path = entry(rec)
    good = path.read_bytes()

    def replace(data: bytes, mode: int = 0o644) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        os.replace(tmp, path)

    u, i = int(USERS[0]), int(ITEMS[0])
    assert query(mysql_conn, "SELECT recsql_invoke(%s, %s, %s)", (name, u, i))[0][0] is not None
    replace(good[: len(good) // 2])
    _fails_with(mysql_conn, name, "its header says")  # truncated: the old model is not used
    replace(good[:100])
    _fails_with(mysql_conn, name, "truncated")
    flipped = bytearray(good)
    flipped[len(good) - 300] ^= 0x10
    replace(bytes(flipped))
    _fails_with(mysql_conn, name, "checksum mismatch")
    versioned = bytearray(good)
    versioned[8] = 3
    replace(bytes(versioned))
    _fails_with(mysql_conn, name, "version 3")
    replace(b"GIF89a" + good[6:])
    _fails_with(mysql_conn, name, "bad magic")
    replace(good, 0o666)
    _fails_with(mysql_conn, name, "writable by group/others")
    path.unlink()
    _fails_with(mysql_conn, name, "No such file")
    replace(good)  # back to a good file: scores again
    assert query(mysql_conn, "SELECT recsql_invoke(%s, %s, %s)", (name, u, i))[0][0] is not None


def test_oversized_file_is_refused(mysql_conn, entry, models, fresh_database) -> None:
    big = load_model(models["softmax"])
    big.user_vectors = np.tile(big.user_vectors, (1, 200))  # 300 x 1600 floats: ~2 MB
    big.item_vectors = np.tile(big.item_vectors, (1, 200))
    name, _ = entry(big, max_mb=1)
    _fails_with(mysql_conn, name, "over this entry's limit")
    fn = SqlFunction("will_purchase", PAIR, "FLOAT", endpoint=name)
    mysql_conn.select_db(fresh_database)
    create_functions(mysql_conn, [fn])
    with pytest.raises(pymysql.MySQLError) as raised:
        query(mysql_conn, "SELECT will_purchase_strict(%s, %s)", (int(USERS[0]), int(ITEMS[0])))
    assert raised.value.args[0] == SIGNAL_ERRNO and "limit" in raised.value.args[1]
    _alive(mysql_conn)


# ---------------------------------------------------------------- hot reload


def _server_pid(conn: pymysql.Connection) -> int | None:
    pid_file = query(conn, "SELECT @@pid_file")[0][0]
    datadir = query(conn, "SELECT @@datadir")[0][0]
    candidate = Path(pid_file) if os.path.isabs(pid_file) else Path(datadir) / pid_file
    try:
        pid = int(candidate.read_text().split()[0])
        Path(f"/proc/{pid}/maps").read_text()
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _mappings(pid: int, path: Path) -> int:
    """How many live mappings of `path` (old replaced inodes show as '(deleted)')."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sum(1 for line in lines if str(path) in line)


@pytest.mark.slow
def test_hot_reload_under_concurrent_sessions(mysql_url, mysql_conn, entry, models) -> None:
    """Sessions score while the file is replaced again and again (write, then rename):
    each statement sees one model from its first row to its last, the first statement
    after a replace sees the new one, the server shares one mapping per file, and
    replaced files are unmapped once no statement holds them."""
    recs = [load_model(models["softmax"]), load_model(models["softmax2"])]
    name, path = entry(recs[0])
    u, i = int(USERS[5]), int(ITEMS[9])
    expected = [float(r.score(np.array([u]), np.array([i]))[0]) for r in recs]
    assert abs(expected[0] - expected[1]) > 1e-6
    query(mysql_conn, "CREATE TABLE IF NOT EXISTS rvec_long (k INT PRIMARY KEY)")
    if query(mysql_conn, "SELECT COUNT(*) FROM rvec_long")[0][0] < 200_000:
        query(mysql_conn, "INSERT IGNORE INTO rvec_long SELECT seq FROM seq_1_to_200000")
    statement = (
        "SELECT MIN(s), MAX(s), COUNT(*) FROM (SELECT recsql_invoke(%s, %s, %s + k * 0) AS s "
        "FROM rvec_long) t"
    )
    stop = threading.Event()
    seen: list[tuple[float, float, int]] = []
    errors: list[BaseException] = []

    def session() -> None:
        conn = mysql_connect(mysql_url)
        try:
            while not stop.is_set():
                seen.append(query(conn, statement, (name, u, i))[0])
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=session) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for n in range(12):
            write_vectors(recs[(n + 1) % 2], path)
            time.sleep(0.15)
            # the next statement of any session uses the file now in place
            got = query(mysql_conn, "SELECT recsql_invoke(%s, %s, %s)", (name, u, i))[0][0]
            assert near(got, expected[(n + 1) % 2])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    assert len(seen) >= 6
    for low, high, count in seen:
        assert count == 200_000
        assert low == high  # one model per statement, even when replaced mid-statement
        assert min(abs(low - e) for e in expected) <= 1e-6
    assert {round(low, 6) for low, _, _ in seen} == {round(e, 6) for e in expected}
    pid = _server_pid(mysql_conn)
    if pid is not None:  # a server on this machine: its mappings are visible
        query(mysql_conn, "SELECT recsql_invoke(%s, %s, %s)", (name, u, i))
        assert _mappings(pid, path) == 1
    query(mysql_conn, "DROP TABLE rvec_long")


def test_sessions_that_keep_a_model_see_its_replacement(
    mysql_url, mysql_conn, fresh_database, entry, models
) -> None:
    """Each session's thread keeps the last model it used from one statement to the
    next (a stored function runs the loadable function's init for every row): after a
    replace, the next statement of such a session still scores with the new file,
    through the wrapper and the direct function, and a session that stays idle does
    not keep the replaced file mapped."""
    recs = [load_model(models["softmax"]), load_model(models["softmax2"])]
    name, path = entry(recs[0])
    mysql_conn.select_db(fresh_database)
    create_functions(mysql_conn, [SqlFunction("will_purchase", PAIR, "FLOAT", endpoint=name)])
    idle = mysql_connect(mysql_url.rsplit("/", 1)[0] + "/" + fresh_database)
    u, i = int(USERS[8]), int(ITEMS[4])
    expected = [float(r.score(np.array([u]), np.array([i]))[0]) for r in recs]
    assert abs(expected[0] - expected[1]) > 1e-6
    sql = "SELECT CAST(will_purchase(%s, %s) AS DOUBLE), recsql_invoke(%s, %s, %s)"
    pid = _server_pid(mysql_conn)
    try:
        for n in range(4):
            for conn in (mysql_conn, idle):  # both sessions now hold the file in place
                wrapper, direct = query(conn, sql, (u, i, name, u, i))[0]
                assert near(wrapper, expected[n % 2]) and near(direct, expected[n % 2])
            write_vectors(recs[(n + 1) % 2], path)
            wrapper, direct = query(mysql_conn, sql, (u, i, name, u, i))[0]
            assert near(wrapper, expected[(n + 1) % 2]) and near(direct, expected[(n + 1) % 2])
            if pid is not None:  # the idle session let go of the old file
                assert _mappings(pid, path) == 1
    finally:
        idle.close()


def test_install_in_server_and_replace(mysql_url, fresh_database, vec_dir, models) -> None:
    """`recsql sql install --in-server`: wrappers score from the file; re-running it with
    another model replaces the file, and the next statement scores with that model."""
    url = mysql_url.rsplit("/", 1)[0] + "/" + fresh_database
    name = f"rvec-{uuid.uuid4().hex[:8]}"
    fn = SqlFunction("will_purchase", PAIR, "FLOAT", endpoint=name)
    vectors = vec_dir / f"{name}.vectors"
    conn = mysql_connect(url)
    try:
        u, i = int(USERS[1]), int(ITEMS[2])
        for model in ("softmax", "mse"):
            summary = install_in_server(url, [fn], models[model], vectors)
            assert f"in-server model {vectors}" in summary
            want = float(load_model(models[model]).score(np.array([u]), np.array([i]))[0])
            got = query(conn, "SELECT CAST(will_purchase(%s, %s) AS DOUBLE)", (u, i))[0][0]
            assert near(got, want)
        allow = Path(query(conn, "SELECT recsql_endpoints_path()")[0][0])
        assert f"{name} file://{vectors}" in allow.read_text()
        write_allow_list(allow, {}, remove=[name])
    finally:
        conn.close()


def test_recsql_score_in_server(mysql_url, fresh_database, entry, models) -> None:
    """`recsql score --engine mysql --in-server`: one INSERT ... SELECT in the server; the
    strict path (on_error=error) aborts on a bad model and keeps the old table."""
    from db.score import ScoreOptions, score_mysql_in_server

    rec = load_model(models["softmax"])
    name, path = entry(rec)
    fn = SqlFunction("will_purchase", PAIR, "FLOAT", endpoint=name)
    url = mysql_url.rsplit("/", 1)[0] + "/" + fresh_database
    conn = mysql_connect(url)
    try:
        create_functions(conn, [fn])
        users, items = sample_pairs(1000, seed=9)
        query(conn, "CREATE TABLE pairs (a BIGINT, b BIGINT)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO pairs VALUES (%s, %s)",
                list(zip(users.tolist(), items.tolist(), strict=True)),
            )
        for on_error in ("null", "error"):
            stats = score_mysql_in_server(
                url, "SELECT a, b FROM pairs", ScoreOptions(fn, "scores", on_error=on_error)
            )
            assert stats.rows == 1000 and stats.nulls == 205
            rows = query(conn, "SELECT user_id, product_id, CAST(score AS DOUBLE) FROM scores")
            got = {(u, i): s for u, i, s in rows}
            want = endpoint_scores(rec, users, items, "null")
            for u, i, w in zip(users.tolist(), items.tolist(), want, strict=True):
                if np.isnan(w):
                    assert got[(u, i)] is None
                else:
                    assert near(got[(u, i)], float(w))
        path.write_bytes(b"not a vectors file, and far too short")
        with pytest.raises(Exception, match="bad magic|truncated"):
            score_mysql_in_server(url, "SELECT a, b FROM pairs", ScoreOptions(fn, "scores"))
        assert query(conn, "SELECT COUNT(*) FROM scores") == [(1000,)]
    finally:
        conn.close()


def test_a_removed_file_is_unmapped(mysql_conn, entry, models) -> None:
    """The server lets go of a file that was removed, once anything changes, even if its
    name is never called again (no 900 MB model kept mapped by a forgotten entry)."""
    pid = _server_pid(mysql_conn)
    if pid is None:
        pytest.skip("the server's /proc is not visible from here")
    rec = load_model(models["mse"])
    gone, gone_path = entry(rec)
    other, _ = entry(rec)
    u, i = int(USERS[0]), int(ITEMS[0])
    assert query(mysql_conn, "SELECT recsql_invoke(%s, %s, %s)", (gone, u, i))[0][0] is not None
    assert _mappings(pid, gone_path) == 1
    gone_path.unlink()
    assert query(mysql_conn, "SELECT recsql_invoke(%s, %s, %s)", (other, u, i))[0][0] is not None
    assert _mappings(pid, gone_path) == 0


def test_cli_install_and_score_in_server(
    mysql_url, fresh_database, vec_dir, models, allow_list, tmp_path, capsys
) -> None:
    """`recsql sql install --in-server` and `recsql score --in-server` as a user types them."""
    import json

    from recsql_cli import main

    url = mysql_url.rsplit("/", 1)[0] + "/" + fresh_database
    name = f"rvec-cli-{uuid.uuid4().hex[:8]}"
    allow_list[1].append(name)
    functions = tmp_path / "functions.json"
    functions.write_text(
        json.dumps(
            [
                {
                    "name": "will_purchase",
                    "args": [["user_id", "BIGINT"], ["product_id", "BIGINT"]],
                    "returns": "FLOAT",
                    "endpoint": name,
                }
            ]
        )
    )
    common = ["--engine", "mysql", "--db", url, "--functions", str(functions)]
    assert main(["sql", "install", *common, "--in-server"]) == 1
    assert "--in-server needs --model-dir" in capsys.readouterr().err
    vectors = vec_dir / f"{name}.vectors"
    argv = ["sql", "install", *common, "--in-server", "--model-dir", str(models["softmax"])]
    assert main([*argv, "--vectors", str(vectors), "--fallback", "mean"]) == 0
    assert f"in-server model {vectors}" in capsys.readouterr().out
    conn = mysql_connect(url)
    try:
        query(conn, "CREATE TABLE pairs (u BIGINT, p BIGINT)")
        query(
            conn,
            "INSERT INTO pairs VALUES (%s, %s), (1, 2), (NULL, 3)",
            (int(USERS[0]), int(ITEMS[0])),
        )
        score = ["score", *common, "--in-server", "--on-error", "null", "--no-progress"]
        assert main([*score, "--query", "SELECT u, p FROM pairs"]) == 0
        assert "scored 3 rows into scores" in capsys.readouterr().out
        rows = query(conn, "SELECT user_id, CAST(score AS DOUBLE) FROM scores ORDER BY user_id")
        rec = load_model(models["softmax"])
        assert rows[0] == (None, None)  # a NULL argument: NULL, even under fallback mean
        assert near(rows[1][1], 1.0 / len(ITEMS))  # unknown ids: the mean fallback
        assert near(rows[2][1], float(rec.score(USERS[:1], ITEMS[:1])[0]))
    finally:
        conn.close()


def test_reload_through_a_symbolic_link(mysql_conn, entry, models, vec_dir) -> None:
    """The allow-list may name a link (e.g. to a versioned file elsewhere): replacing the
    link's target, in another directory, is seen by the next statement too."""
    recs = [load_model(models["softmax"]), load_model(models["softmax2"])]
    elsewhere = vec_dir / f"real-{uuid.uuid4().hex[:8]}"
    elsewhere.mkdir()
    elsewhere.chmod(0o755)
    target = elsewhere / "model.vectors"
    write_vectors(recs[0], target)
    name, link = entry(None)
    link.symlink_to(target)
    u, i = int(USERS[2]), int(ITEMS[4])
    for n in (0, 1, 0):
        write_vectors(recs[n], target)
        got = query(mysql_conn, "SELECT recsql_invoke(%s, %s, %s)", (name, u, i))[0][0]
        assert near(got, float(recs[n].score(np.array([u]), np.array([i]))[0]))


def test_a_long_lived_server_keeps_taking_new_models(mysql_conn, allow_list, vec_dir, models):
    """Hundreds of models, each listed, called and taken off the allow-list in turn: the
    server keeps scoring (a file's cache slot is reused once it is unmapped) and keeps
    at most a few of them mapped."""
    path, names = allow_list
    rec = load_model(models["mse"])
    base = vec_dir / "many.vectors"
    write_vectors(rec, base)
    u, i = int(USERS[0]), int(ITEMS[0])
    want = float(rec.score(np.array([u]), np.array([i]))[0])
    for n in range(300):
        name = f"rvec-many-{uuid.uuid4().hex[:8]}"
        vectors = vec_dir / f"{name}.vectors"
        shutil.copyfile(base, vectors)
        vectors.chmod(0o644)
        write_allow_list(path, {name: Vectors(vectors)})
        rows = query(
            mysql_conn, "SELECT recsql_invoke(%s, %s, %s), recsql_last_error()", (name, u, i)
        )
        assert rows[0][1] is None and near(rows[0][0], want), (n, rows)
        write_allow_list(path, {}, remove=[name])
    pid = _server_pid(mysql_conn)
    if pid is not None:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert maps.count("rvec-many-") <= 2
