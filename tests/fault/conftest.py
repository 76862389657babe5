"""Fixtures for the fault tests, reused from tests/serve and tests/db (not redefined)."""

from tests.db.conftest import fresh_database, mysql_conn, mysql_url  # noqa: F401
from tests.serve.conftest import model_dir  # noqa: F401
