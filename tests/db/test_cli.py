"""`recsql sql | load | score` through the real entry point."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from recsql_cli import main
from tests.db import mysql_support
from tests.db.rees46_files import event_lines, write_events
from tests.db.scoring_server import ScoringServer

mysql_db = mysql_support.mysql_db  # fixture: a fresh database per test


def test_load_query_score_on_duckdb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = write_events(tmp_path / "ev.csv.gz", event_lines(2000))
    db = str(tmp_path / "shop.duckdb")
    assert main(["load", "--db", db, str(events)]) == 0
    assert "loaded 2,000 events" in capsys.readouterr().out
    with ScoringServer() as srv:
        ep = f"recsql={srv.url}"
        assert (
            main(
                [
                    "sql",
                    "query",
                    "--db",
                    db,
                    "--endpoint",
                    ep,
                    "SELECT will_purchase(1, 2) AS s, will_purchase(-1, 2) AS n",
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert out.splitlines() == ["s       n", "0.3402  NULL", "(1 row)"]
        assert (
            main(
                [
                    "sql",
                    "query",
                    "--db",
                    db,
                    "--endpoint",
                    ep,
                    "--example",
                    "user_candidates",
                    "--param",
                    "user_id=500000003",
                ]
            )
            == 0
        )
        assert "product_id  category_code" in capsys.readouterr().out
        assert (
            main(
                [
                    "score",
                    "--db",
                    db,
                    "--endpoint",
                    ep,
                    "--no-progress",
                    "--query",
                    "SELECT DISTINCT user_id, product_id FROM events",
                    "--table",
                    "s1",
                ]
            )
            == 0
        )
        assert "rows into s1" in capsys.readouterr().out
    con = duckdb.connect(db)
    assert con.execute("SELECT count(*), count(score) FROM s1").fetchall()[0][0] > 0
    con.close()


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "x.duckdb")
    assert main(["load", "--db", db, str(tmp_path / "missing.csv")]) == 1
    assert "no such event file" in capsys.readouterr().err
    assert (
        main(
            [
                "sql",
                "query",
                "--db",
                db,
                "--endpoint",
                "recsql=http://127.0.0.1:9",
                "SELECT nope FROM nowhere",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("recsql sql: error: ") and len(err.strip().splitlines()) == 1
    assert main(["score", "--db", db, "--endpoint", "bad", "--query", "SELECT 1, 2"]) == 1
    assert "expected NAME=http" in capsys.readouterr().err


def test_aurora_install_prints_ddl_and_grants(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "sql",
                "install",
                "--engine",
                "aurora",
                "--database",
                "shop",
                "--user",
                "app",
                "--sagemaker-endpoint",
                "recsql-endpoint",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "  ENDPOINT NAME 'recsql-endpoint'\n  MAX_BATCH_SIZE 10000;" in out
    assert "GRANT AWS_SAGEMAKER_ACCESS TO 'app'@'%';" in out


def test_examples_print(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "examples"]) == 0
    out = capsys.readouterr().out
    assert out.count("-- ") == 4 and "ROW_NUMBER() OVER" in out


@pytest.mark.mysql
def test_load_and_score_on_mysql(
    tmp_path: Path,
    mysql_db: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = write_events(tmp_path / "ev.csv", event_lines(1500))
    assert main(["load", "--engine", "mysql", "--db", mysql_db, str(events)]) == 0
    assert "into mysql" in capsys.readouterr().out
    with ScoringServer() as srv:
        assert (
            main(
                [
                    "score",
                    "--engine",
                    "mysql",
                    "--db",
                    mysql_db,
                    "--no-progress",
                    "--endpoint",
                    f"recsql={srv.url}",
                    "--query",
                    "SELECT DISTINCT user_id, product_id FROM events",
                ]
            )
            == 0
        )
    assert "rows into scores" in capsys.readouterr().out
    assert (
        main(
            [
                "sql",
                "query",
                "--engine",
                "mysql",
                "--db",
                mysql_db,
                "SELECT count(*) AS n FROM scores WHERE score IS NOT NULL",
            ]
        )
        == 0
    )
    assert int(capsys.readouterr().out.splitlines()[1]) > 0
