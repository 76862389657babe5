"""SQL that invokes ML: DuckDB, local MySQL/MariaDB and Aurora MySQL functions."""
