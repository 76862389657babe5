"""`recsql sql install | query | examples`, `recsql load`, `recsql score`, `recsql events push`.

Endpoint names in SQL resolve to URLs through `--endpoint NAME=URL` (repeatable)
or RECSQL_ENDPOINTS="name=url,..."; without either, `recsql` means
http://127.0.0.1:8080 (what `recsql serve` listens on by default).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from model.errors import BadRequest, first_line

DEFAULT_ENDPOINTS = "recsql=http://127.0.0.1:8080"
_ENGINE_HELP = "duckdb: --db is a .duckdb file; mysql: --db is mysql://user[:pw]@host[:port]/db"


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_sql(subparsers)
    _add_load(subparsers)
    _add_score(subparsers)
    _add_demo(subparsers)
    _add_events(subparsers)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole job end to end: events -> train -> serve -> SQL",
        description="Generate (or take) REES46 event files, train MFBlock on CPU, start the "
        "server on loopback, load the events into DuckDB (or MySQL/MariaDB when "
        "RECSQL_MYSQL_URL or --mysql-url is set), create will_purchase(), run the example "
        "SQL and print the results, then stop the server.",
    )
    from db.demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from db.demo import run_demo

    return run_demo(args)


# ----------------------------------------------------------------------- helpers


def _add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="where the endpoint NAME that a function uses is served (repeatable); default: "
        f"$RECSQL_ENDPOINTS or {DEFAULT_ENDPOINTS}",
    )
    p.add_argument(
        "--functions",
        type=Path,
        metavar="JSON",
        help="function definitions (default: will_purchase(user_id BIGINT, product_id BIGINT) "
        "and similar_score(product_a BIGINT, product_b BIGINT), RETURNS FLOAT, on endpoint "
        "recsql)",
    )


def _endpoints(args: argparse.Namespace) -> Any:
    from db.http import ENV_VAR, Endpoints, parse_endpoints

    spec = args.endpoint or os.environ.get(ENV_VAR) or DEFAULT_ENDPOINTS
    return Endpoints(parse_endpoints(spec))


def _functions(args: argparse.Namespace, *, events: bool = False) -> list[Any]:
    """--functions, or the default scoring functions (+ the events functions, `events`)."""
    from db.functions import DEFAULT_FUNCTIONS, EVENT_FUNCTIONS, load_functions

    if args.functions:
        return load_functions(args.functions)
    return [*DEFAULT_FUNCTIONS, *(EVENT_FUNCTIONS if events else ())]


def _duckdb(path: str) -> Any:
    import duckdb

    try:
        return duckdb.connect(path)
    except duckdb.Error as exc:
        raise BadRequest(f"cannot open DuckDB database {path}: {exc}") from exc


# --------------------------------------------------------------------------- sql


def _add_sql(subparsers: argparse._SubParsersAction) -> None:
    sql = subparsers.add_parser(
        "sql",
        help="install the SQL functions, run SQL that calls them, show example queries",
        description="SQL functions that score (user, product) pairs by calling the recsql "
        "server. DuckDB registers them as vectorised Python UDFs in the running process (one "
        "HTTP request per 2,048-row chunk), so run DuckDB SQL through `recsql sql query`. "
        "MySQL/MariaDB gets a loadable C function; Aurora MySQL calls SageMaker itself.",
    )
    sub = sql.add_subparsers(dest="sql_command", metavar="SQL_COMMAND", required=True)

    inst = sub.add_parser(
        "install",
        help="install the functions on MySQL/MariaDB, or print the Aurora DDL and GRANTs",
        description="mysql: build/install the loadable function (needs INSERT on the mysql "
        "schema and the server's plugin_dir) and write its endpoint allow-list. aurora: print "
        "CREATE FUNCTION ... ALIAS AWS_SAGEMAKER_INVOKE_ENDPOINT and the GRANTs; with "
        "--setup-cluster also create the IAM role, parameter group and cluster role via boto3 "
        "(AWS credentials from the usual boto3 sources).",
    )
    inst.add_argument("--engine", choices=("mysql", "aurora"), required=True)
    inst.add_argument("--db", help="mysql: mysql://user[:pw]@host[:port]/db")
    inst.add_argument("--database", default="recsql", help="aurora: schema (default recsql)")
    inst.add_argument("--user", help="aurora: MySQL user to GRANT the functions to")
    inst.add_argument(
        "--aurora-version",
        type=int,
        choices=(2, 3),
        default=3,
        help="Aurora MySQL 3 (MySQL 8.0, default) or 2 (5.7): the GRANTs differ",
    )
    inst.add_argument(
        "--sagemaker-endpoint",
        help="aurora: SageMaker endpoint name (default: each function's endpoint name)",
    )
    inst.add_argument(
        "--setup-cluster",
        metavar="CLUSTER_ID",
        help="aurora: also set up this DB cluster through boto3",
    )
    inst.add_argument(
        "--events-table",
        metavar="TABLE",
        help="aurora: also print an AFTER INSERT trigger on TABLE (columns user_id, product_id, "
        "event_type, event_time) that sends each row to the fresh-event store through "
        "lambda_async and the Lambda deploy/events_lambda.py (needs --events-lambda)",
    )
    inst.add_argument(
        "--events-lambda", metavar="ARN", help="aurora: the events Lambda's function ARN"
    )
    inst.add_argument("--region", help="aurora: AWS region (default: boto3's)")
    inst.add_argument("--role-name", default="recsql-aurora-sagemaker", help="aurora: IAM role")
    inst.add_argument(
        "--in-server",
        action="store_true",
        help="mysql: score inside the server from a vectors file exported from --model-dir "
        "(a recommender), instead of calling the HTTP endpoint; re-run to replace the model",
    )
    inst.add_argument("--model-dir", type=Path, help="--in-server: the recommender artifact")
    inst.add_argument(
        "--vectors",
        type=Path,
        help="--in-server: the vectors file the server maps (default "
        "/var/lib/recsql/recsql.vectors; the server must be able to read it)",
    )
    inst.add_argument(
        "--fallback",
        choices=("null", "mean", "popularity"),
        default="null",
        help="--in-server: score of unknown ids, as the endpoint's RECSQL_FALLBACK (default null)",
    )
    _add_endpoint_args(inst)
    inst.set_defaults(func=_run_install)

    query = sub.add_parser(
        "query",
        help="run SQL with the functions available (DuckDB or MySQL)",
        description="Run one SQL statement, or a named example (--example), and print the "
        "rows. On DuckDB the functions are registered in this process first.",
    )
    query.add_argument("sql", nargs="?", help="the SQL to run")
    query.add_argument("--engine", choices=("duckdb", "mysql"), default="duckdb", help=_ENGINE_HELP)
    query.add_argument("--db", default="recsql.duckdb", help="database (see --engine)")
    query.add_argument("--example", help="run an example query instead (see `recsql sql examples`)")
    query.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=INT",
        help="example query parameter, e.g. --param user_id=42 (repeatable)",
    )
    query.add_argument(
        "--on-error",
        choices=("error", "null"),
        default="error",
        help="DuckDB: when a request fails, fail the query (default) or NULL",
    )
    _add_endpoint_args(query)
    query.set_defaults(func=_run_query)

    ex = sub.add_parser(
        "examples",
        help="print the example queries",
        description="Print the example queries with default parameter values.",
    )
    ex.add_argument("--name", help="only this example")
    ex.set_defaults(func=_run_examples)


def _run_install(args: argparse.Namespace) -> int:
    functions = _functions(args, events=args.engine == "mysql" and not args.in_server)
    if args.engine == "aurora":
        return _install_aurora(args, functions)
    if not args.db:
        raise BadRequest("--db mysql://user@host:port/db is required for --engine mysql")
    try:
        from db import mysql_udf
    except ModuleNotFoundError as exc:
        raise BadRequest("the MySQL/MariaDB loadable function is not available") from exc
    if args.in_server:
        if not args.model_dir:
            raise BadRequest("--in-server needs --model-dir (the recommender to export)")
        vectors = args.vectors or mysql_udf.DEFAULT_VECTORS_DIR / "recsql.vectors"
        print(
            mysql_udf.install_in_server(
                args.db, functions, args.model_dir, vectors, fallback=args.fallback
            )
        )
        return 0
    endpoints = _endpoints(args)
    print(mysql_udf.install_mysql_functions(args.db, functions, endpoints.urls))
    return 0


def _install_aurora(args: argparse.Namespace, functions: list[Any]) -> int:
    from db.aurora import aurora_events_script, aurora_install_script, setup_aurora_cluster

    if bool(args.events_table) != bool(args.events_lambda):
        raise BadRequest("--events-table and --events-lambda go together")
    print(
        aurora_install_script(
            args.database,
            functions,
            user=args.user,
            aurora_version=args.aurora_version,
            endpoint_name=args.sagemaker_endpoint,
        ),
        end="",
    )
    if args.events_table:
        print()
        print(
            aurora_events_script(
                args.events_table,
                args.events_lambda,
                user=args.user,
                aurora_version=args.aurora_version,
            ),
            end="",
        )
    if args.setup_cluster:
        import boto3

        session = boto3.Session(region_name=args.region)
        names = (
            [args.sagemaker_endpoint]
            if args.sagemaker_endpoint
            else [f.endpoint for f in functions]
        )
        report = setup_aurora_cluster(session, args.setup_cluster, names, role_name=args.role_name)
        print()
        for action in report.actions:
            print(f"-- {action}")
        print(f"-- {report.reboot_note(args.setup_cluster)}")
    return 0


def _run_query(args: argparse.Namespace) -> int:
    from db.queries import print_table, run_example_query

    if bool(args.sql) == bool(args.example):
        raise BadRequest("give either SQL or --example NAME")
    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise BadRequest(f"bad --param {item!r}: expected NAME=INTEGER")
        params[name] = int(value)
    con = _connect(args)
    try:
        if args.example:
            columns, rows = run_example_query(args.engine, con, args.example, params)
        else:
            columns, rows = _execute(args.engine, con, args.sql)
    finally:
        con.close()
    print_table(columns, rows)
    return 0


def _connect(args: argparse.Namespace) -> Any:
    if args.engine == "mysql":
        from db.load import mysql_connect

        return mysql_connect(args.db)
    from db.duckdb_udf import install_duckdb_functions

    con = _duckdb(args.db)
    functions = _functions(args, events=True)
    install_duckdb_functions(con, _endpoints(args), functions, on_error=args.on_error)
    return con


def _execute(engine: str, con: Any, sql: str) -> tuple[list[str], list[tuple]]:
    if engine == "duckdb":
        import duckdb

        try:
            cur = con.execute(sql)
            rows = cur.fetchall()
        except duckdb.Error as exc:
            raise BadRequest(first_line(exc)) from exc
        return [d[0] for d in cur.description or []], rows
    import pymysql

    with con.cursor() as cur:
        try:
            cur.execute(sql)
        except pymysql.MySQLError as exc:
            raise BadRequest(f"MySQL: {exc}") from exc
        return [d[0] for d in cur.description or []], list(cur.fetchall())


def _run_examples(args: argparse.Namespace) -> int:
    from db.queries import EXAMPLES

    names = [args.name] if args.name else list(EXAMPLES)
    for name in names:
        if name not in EXAMPLES:
            raise BadRequest(f"no example query {name!r}; known: {', '.join(EXAMPLES)}")
        query = EXAMPLES[name]
        print(f"-- {query.name}: {query.title}\n{query.literal()};\n")
    return 0


# -------------------------------------------------------------------------- load


def _add_load(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "load",
        help="load REES46 event files into DuckDB or MySQL (tables events, users, products)",
        description="Load REES46 event CSVs (.csv or .csv.gz) into tables events, users and "
        "products, replacing them: re-running never duplicates rows, and a failed load keeps "
        "the previous tables. MySQL needs local_infile=ON on the server.",
    )
    p.add_argument("files", nargs="+", type=Path, help="event files")
    p.add_argument("--engine", choices=("duckdb", "mysql"), default="duckdb", help=_ENGINE_HELP)
    p.add_argument("--db", default="recsql.duckdb", help="database (see --engine)")
    p.set_defaults(func=_run_load)


def _run_load(args: argparse.Namespace) -> int:
    from db.load import load_events_duckdb, load_events_mysql

    if args.engine == "mysql":
        stats = load_events_mysql(args.db, args.files)
    else:
        con = _duckdb(args.db)
        try:
            stats = load_events_duckdb(con, args.files)
        finally:
            con.close()
    print(stats.summary())
    return 0


# ------------------------------------------------------------------------- score


def _add_score(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score the (user, product) pairs of a query in bulk into a table",
        description="Stream the rows of --query (one column per function argument, e.g. "
        "user_id, product_id), score them over HTTP in batches with several requests in "
        "flight, and write TABLE(user_id, product_id, score), replacing it only when all rows "
        "are scored. score is NULL for unknown ids or NULL arguments.",
    )
    p.add_argument("--engine", choices=("duckdb", "mysql"), default="duckdb", help=_ENGINE_HELP)
    p.add_argument("--db", default="recsql.duckdb", help="database (see --engine)")
    p.add_argument("--query", required=True, help='e.g. "SELECT user_id, product_id FROM pairs"')
    p.add_argument("--table", default="scores", help="output table (default scores)")
    p.add_argument("--function", default=None, help="function to score with (default: the first)")
    p.add_argument("--batch", type=int, default=10_000, help="rows per request (default 10000)")
    p.add_argument("--workers", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument(
        "--on-error",
        choices=("error", "null"),
        default="error",
        help="a failed request stops the run (default; the table is left as it was) "
        "or makes its rows NULL",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--in-server",
        action="store_true",
        help="mysql: score inside the server with the in-server model (`recsql sql install "
        "--in-server`) in one INSERT ... SELECT; --on-error null calls the loadable function "
        "directly (fastest), error goes through the strict wrapper",
    )
    _add_endpoint_args(p)
    p.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from db.score import ScoreOptions, score_duckdb, score_mysql

    functions = {f.name: f for f in _functions(args)}
    name = args.function or next(iter(functions))
    if name not in functions:
        raise BadRequest(f"no function {name!r}; defined: {', '.join(functions)}")
    opts = ScoreOptions(
        functions[name],
        args.table,
        args.batch,
        args.workers,
        args.on_error,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if args.in_server:
        from db.score import score_mysql_in_server

        if args.engine != "mysql":
            raise BadRequest("--in-server is for --engine mysql")
        print(score_mysql_in_server(args.db, args.query, opts).summary())
        return 0
    endpoints = _endpoints(args)
    try:
        if args.engine == "mysql":
            stats = score_mysql(args.db, args.query, endpoints, opts)
        else:
            con = _duckdb(args.db)
            try:
                stats = score_duckdb(con, args.query, endpoints, opts)
            finally:
                con.close()
    finally:
        endpoints.close()
    print(stats.summary())
    return 0


# ------------------------------------------------------------------------ events


def _add_events(subparsers: argparse._SubParsersAction) -> None:
    events = subparsers.add_parser(
        "events",
        help="send events to a server's fresh-event store (back-fill)",
        description="Fresh events from SQL: DuckDB's record_event() / record_session_event() "
        "(in `recsql sql query`), MariaDB/MySQL's AFTER INSERT trigger (`recsql sql install "
        "--engine mysql`), and, for a back-fill, `recsql events push`.",
    )
    sub = events.add_subparsers(dest="events_command", metavar="EVENTS_COMMAND", required=True)
    push = sub.add_parser(
        "push",
        help="send events from REES46 files or a SQL query to an endpoint, in batches",
        description="Read events from REES46 CSV files (.csv, .csv.gz) or from --query "
        "on --engine duckdb|mysql (columns user_id or session_id, product_id, and optionally "
        'event_type, event_time), and POST them as {"events": [...]} to the endpoint NAME, '
        "BATCH events a request, one request at a time in row order (send events oldest first: "
        "the store keeps each user's latest). A row the server rejects is counted and skipped; "
        "a failed request stops the push (exit 1) saying how many events were taken.",
    )
    push.add_argument("files", nargs="*", type=Path, help="REES46 event files")
    push.add_argument("--query", help='e.g. "SELECT * FROM events ORDER BY event_time"')
    push.add_argument("--engine", choices=("duckdb", "mysql"), default="duckdb", help=_ENGINE_HELP)
    push.add_argument("--db", default="recsql.duckdb", help="--query's database (see --engine)")
    push.add_argument(
        "--to", default="recsql", metavar="NAME", help="the endpoint name (default recsql)"
    )
    push.add_argument(
        "--batch", type=int, default=500, help="events per request (default 500, at most 10000)"
    )
    push.add_argument("--no-progress", action="store_true", help="no progress bar")
    push.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="where the endpoint NAME is served (repeatable); default: $RECSQL_ENDPOINTS or "
        f"{DEFAULT_ENDPOINTS}",
    )
    push.set_defaults(func=_run_events_push)


def _run_events_push(args: argparse.Namespace) -> int:
    from db.events import MAX_BATCH, duckdb_batches, file_batches, mysql_batches, push_events

    if bool(args.files) == bool(args.query):
        raise BadRequest("give either event files or --query")
    if not 1 <= args.batch <= MAX_BATCH:
        raise BadRequest(f"--batch must be 1..{MAX_BATCH}")
    endpoints = _endpoints(args)
    con = None
    try:
        pool = endpoints.pool(args.to)
        if args.files:
            batches = file_batches(args.files, args.batch)
        elif args.engine == "mysql":
            batches = mysql_batches(args.db, args.query, args.batch)
        else:
            con = _duckdb(args.db)
            batches = duckdb_batches(con, args.query, args.batch)
        stats = push_events(batches, pool, progress=not args.no_progress)
    finally:
        if con is not None:
            con.close()
        endpoints.close()
    print(stats.summary())
    return 0
