"""`mysql_db`: the URL of a fresh MariaDB/MySQL database, built on conftest's fixtures.

conftest.py's `mysql_url` skips (or, under CI, fails) when no server can be reached, and
`fresh_database` creates and drops the database.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest


@pytest.fixture
def mysql_db(mysql_url: str, fresh_database: str) -> str:
    return urlunsplit(urlsplit(mysql_url)._replace(path=f"/{fresh_database}"))
