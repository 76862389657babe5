"""Loading REES46 files into real DuckDB and a real MariaDB/MySQL database."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from db.load import load_events_duckdb, load_events_mysql, mysql_connect
from model.errors import DataError
from tests.db import mysql_support
from tests.db.rees46_files import event_lines, write_events

mysql_db = mysql_support.mysql_db  # fixture: a fresh database per test

BAD_ROWS = [
    "2019-10-01 00:00:00 UTC,view,,2000000,,,1.00,500000001,s",  # no product
    "not a time,view,1000001,2000000,,,1.00,500000001,s",
    "2019-10-01 00:00:00 UTC,teleport,1000001,2000000,,,1.00,500000001,s",
]


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    a = write_events(tmp_path / "2019-Oct.csv", event_lines(600) + BAD_ROWS)
    b = write_events(tmp_path / "2019-Nov.csv.gz", event_lines(400, start=600))
    return [a, b]


def _expected(files: list[Path]) -> dict[str, int]:
    events = event_lines(600) + event_lines(400, start=600)
    users = len({line.split(",")[-2] for line in events})
    products = len({line.split(",")[2] for line in events})
    return {"events": len(events), "users": users, "products": products}


def test_duckdb_load_counts_latest_attributes_and_rerun(files: list[Path]) -> None:
    con = duckdb.connect()
    stats = load_events_duckdb(con, files + [files[0]])  # a file listed twice loads once
    exp = _expected(files)
    assert (stats.events, stats.users, stats.products) == (
        exp["events"],
        exp["users"],
        exp["products"],
    )
    assert stats.rows_read == exp["events"] + 3 and stats.skipped == 3 and stats.rows_per_s > 0
    # brand with a comma and quotes survives; empty brand is NULL
    brands = {b for (b,) in con.execute("SELECT DISTINCT brand FROM products").fetchall()}
    assert 'acme, "the best"' in brands and None in brands and "" not in brands
    purchases = con.execute("SELECT sum(n_purchases) FROM users").fetchall()[0][0]
    assert (
        purchases
        == con.execute("SELECT count(*) FROM events WHERE event_type = 'purchase'").fetchall()[0][0]
        > 0
    )
    again = load_events_duckdb(con, files)
    assert again.events == stats.events
    assert con.execute("SELECT count(*) FROM events").fetchall()[0][0] == exp["events"]
    con.close()


def test_duckdb_failed_load_keeps_previous_tables(files: list[Path], tmp_path: Path) -> None:
    con = duckdb.connect()
    load_events_duckdb(con, files)
    before = con.execute("SELECT count(*) FROM events").fetchall()
    bad = write_events(tmp_path / "bad.csv", ["2019-10-01 00:00:00 UTC,view,notanumber,1,,,1,2,s"])
    with pytest.raises(DataError, match="cannot read the event files"):
        load_events_duckdb(con, [files[0], bad])
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match="not a REES46 event file"):
        load_events_duckdb(con, [wrong])
    with pytest.raises(DataError, match="no such event file"):
        load_events_duckdb(con, [tmp_path / "missing.csv"])
    assert con.execute("SELECT count(*) FROM events").fetchall() == before
    con.close()


def _mysql_counts(url: str) -> dict[str, int]:
    conn = mysql_connect(url)
    with conn.cursor() as cur:
        out = {}
        for t in ("events", "users", "products"):
            cur.execute(f"SELECT count(*) FROM {t}")
            out[t] = cur.fetchall()[0][0]
        cur.execute("SHOW TABLES")
        out["tables"] = sorted(r[0] for r in cur.fetchall())
    conn.close()
    return out


@pytest.mark.mysql
def test_mysql_load_rerun_no_duplicates(files: list[Path], mysql_db: str) -> None:
    stats = load_events_mysql(mysql_db, files)
    exp = _expected(files)
    counts = _mysql_counts(mysql_db)
    assert counts == {**exp, "tables": ["events", "products", "users"]}
    assert stats.events == exp["events"] and stats.skipped == 3
    load_events_mysql(mysql_db, files)
    assert _mysql_counts(mysql_db) == counts
    conn = mysql_connect(mysql_db)
    with conn.cursor() as cur:
        cur.execute("SELECT brand FROM products WHERE brand LIKE 'acme%%' LIMIT 1")
        assert cur.fetchall()[0][0] == 'acme, "the best"'
        cur.execute("SELECT count(*) FROM products WHERE brand IS NULL")
        assert cur.fetchall()[0][0] > 0
        cur.execute("SHOW INDEX FROM events")
        assert {r[2] for r in cur.fetchall()} == {"ix_events_user", "ix_events_product"}
        cur.execute("SELECT min(event_time) FROM events")
        assert str(cur.fetchall()[0][0]) == "2019-10-01 00:00:00"
    conn.close()


@pytest.mark.mysql
def test_mysql_failed_load_keeps_previous_tables(
    files: list[Path],
    mysql_db: str,
    tmp_path: Path,
) -> None:
    load_events_mysql(mysql_db, files)
    before = _mysql_counts(mysql_db)
    # A session id longer than the column: MySQL would truncate it with a warning; we refuse.
    long = write_events(
        tmp_path / "long.csv",
        [
            "2019-12-01 00:00:00 UTC,view,1000001,2000000,,,1.00,500000001," + "x" * 200,
        ],
    )
    with pytest.raises(DataError, match="previous tables kept"):
        load_events_mysql(mysql_db, [files[0], long])
    assert _mysql_counts(mysql_db) == before
