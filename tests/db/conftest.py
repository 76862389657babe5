"""Shared MariaDB/MySQL fixtures for tests/db.

- `mysql_url` (session): the server URL (env RECSQL_TEST_MYSQL_URL, default
  mysql://root@127.0.0.1:3306/test), checked reachable. Unreachable: the test
  skips with how to get a server; under CI (env CI set, e.g. CI=true) it fails instead.
- `mysql_conn`: an autocommit PyMySQL connection to the URL's database, closed after.
- `fresh_database`: the name of a new empty database, dropped after the test.
  Use it with `mysql_conn.select_db(fresh_database)` or a URL with that database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pymysql
import pytest

from db.load import mysql_connect

DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/test"


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{message} (CI=true: the MariaDB tests must run)", pytrace=False)
    pytest.skip(
        f"{message}; start MariaDB 10.11+ (e.g. `apt-get install mariadb-server`, or "
        "`docker run -e MARIADB_ALLOW_EMPTY_ROOT_PASSWORD=1 -e MARIADB_DATABASE=test "
        "-p 127.0.0.1:3306:3306 mariadb:10.11`) or set RECSQL_TEST_MYSQL_URL"
    )


@pytest.fixture(scope="session")
def mysql_url() -> str:
    url = os.environ.get("RECSQL_TEST_MYSQL_URL", DEFAULT_MYSQL_URL)
    try:
        mysql_connect(url, connect_timeout=3).close()
    except Exception as exc:  # any reason the server cannot be used
        _unavailable(f"no MariaDB/MySQL server at {url}: {exc}")
    return url


@pytest.fixture
def mysql_conn(mysql_url: str) -> Iterator[pymysql.Connection]:
    conn = mysql_connect(mysql_url)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def fresh_database(mysql_url: str) -> Iterator[str]:
    name = f"recsql_t_{uuid.uuid4().hex[:8]}"
    admin = mysql_connect(mysql_url)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()
