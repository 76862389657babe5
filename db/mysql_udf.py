"""Install recsql's loadable function (db/udf) into a local MariaDB/MySQL server.

Four steps, each a function the CLI and tests call:

- `build_udf()` compiles db/udf/recsql_udf.so with make, gcc and libcurl.
- `install_udf(conn, endpoints, functions)` copies it into the server's
  `plugin_dir`, registers the loadable functions (`recsql_invoke`,
  `recsql_invoke_str`, `recsql_similar`, `recsql_event`, `recsql_session_event`,
  `recsql_last_error`, `recsql_endpoints_path`) and writes the server-side allow-list
  that maps endpoint names to URLs.
- `create_functions(conn, functions)` creates the SQL functions of
  db/functions.py (e.g. `will_purchase`) and a `<name>_strict` twin of each.
- `drop_functions(conn, functions)` / `uninstall_udf(conn)` undo them.
- `install_mysql_functions(url, functions, endpoints)` does it all (`recsql sql install`).

In-server scoring: an endpoint given as `Vectors(path)` is an allow-list line
`name file:///path`; the same wrappers then score from that vectors file
(db/vectors.py writes it) inside the server, with no HTTP request.

Failure policy (see db/udf/recsql_udf.c): `will_purchase` returns NULL when
the endpoint fails and the server logs the reason at most once per statement;
`will_purchase_strict` raises SQLSTATE 45000 with the reason. NULL arguments
give NULL without a request.

Fresh events (an events function such as `record_event`, db/functions.py): the wrapper
calls recsql_event / recsql_session_event through the allow-list name `<endpoint>.events`,
the endpoint's URL with short timeouts (EVENT_TIMEOUT_MS), so that an AFTER INSERT trigger
never holds an insert up for long. It has no `_strict` twin: it never raises, since an
error in an AFTER INSERT trigger rolls back the user's row (1 taken, 0 rejected, NULL not
sent or not delivered; the reason in recsql_last_error()). `event_trigger_ddl` writes the
trigger. In-server scoring (a vectors file) reads the exported artifact, never the
fresh-event store: events change the HTTP path's scores, not the in-server ones.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pymysql

from db.functions import DEFAULT_FUNCTIONS, SqlFunction
from db.load import mysql_connect
from model.errors import DataError, RecsqlError

log = logging.getLogger(__name__)

UDF_SOURCE_DIR = Path(__file__).resolve().parent / "udf"
SONAME = "recsql_udf.so"
DEFAULT_ALLOW_LIST = Path("/etc/mysql/recsql-endpoints.conf")  # the .so's compiled-in default
DEFAULT_VECTORS_DIR = Path("/var/lib/recsql")  # where `--in-server` writes vectors files
STRICT_SUFFIX = "_strict"
EVENTS_SUFFIX = ".events"  # the allow-list name of an endpoint's events functions
EVENT_TIMEOUT_MS = 1000  # a whole event request, from a trigger
EVENT_CONNECT_TIMEOUT_MS = 200
# name -> return type of the loadable functions in recsql_udf.so
LOADABLE_FUNCTIONS = {
    "recsql_invoke": "REAL",
    "recsql_invoke_str": "STRING",
    "recsql_similar": "REAL",
    "recsql_event": "INTEGER",
    "recsql_session_event": "INTEGER",
    "recsql_last_error": "STRING",
    "recsql_endpoints_path": "STRING",
}
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
_TYPE = re.compile(
    r"^(BIGINT|INT|INTEGER|DOUBLE|FLOAT|DECIMAL|VARCHAR|TEXT)"
    r"(\(\s*\d{1,5}\s*(,\s*\d{1,2}\s*)?\))?(\s+UNSIGNED)?$",
    re.IGNORECASE,
)
_DATABASE = re.compile(r"^[A-Za-z0-9_$]{1,64}$")
_URL = re.compile(r"^https?://\S+$")
_TARGET = re.compile(r"^[\x21-\x7e]{1,1024}$")


@dataclass(frozen=True)
class Endpoint:
    """One allow-list line: where an endpoint name's requests go."""

    url: str
    target_model: str | None = None
    timeout_ms: int | None = None  # whole request; the .so's default is 5000
    connect_timeout_ms: int | None = None  # the .so's default is 1000

    def __post_init__(self) -> None:
        if not _URL.match(self.url) or len(self.url) > 1000:
            raise DataError(f"endpoint URL must be http(s)://... without spaces: {self.url!r}")
        if self.target_model is not None and (
            not _TARGET.match(self.target_model) or "=" in self.target_model
        ):
            raise DataError(f"bad target model {self.target_model!r} (printable, no '=' or space)")
        for name, value, top in (
            ("timeout_ms", self.timeout_ms, 600000),
            ("connect_timeout_ms", self.connect_timeout_ms, 60000),
        ):
            if value is not None and not 1 <= value <= top:
                raise DataError(f"{name} must be 1..{top}, got {value}")

    def line(self, name: str) -> str:
        parts = [name, self.url]
        if self.target_model:
            parts.append(self.target_model)
        if self.timeout_ms:
            parts.append(f"timeout_ms={self.timeout_ms}")
        if self.connect_timeout_ms:
            parts.append(f"connect_timeout_ms={self.connect_timeout_ms}")
        return " ".join(parts)


@dataclass(frozen=True)
class Vectors:
    """One allow-list line for in-server scoring: the name maps to a vectors file
    (db/vectors.py) that recsql_udf.so memory-maps; `max_mb` caps the file it maps."""

    path: Path
    max_mb: int | None = None  # the .so's default is 65536

    def __post_init__(self) -> None:
        path = str(self.path)
        if not path.startswith("/") or any(c.isspace() for c in path) or "/../" in path:
            raise DataError(f"vectors file must be an absolute path without spaces: {path!r}")
        if self.max_mb is not None and not 1 <= self.max_mb <= 1 << 24:
            raise DataError(f"max_mb must be 1..{1 << 24}, got {self.max_mb}")

    def line(self, name: str) -> str:
        return f"{name} file://{self.path}" + (f" max_mb={self.max_mb}" if self.max_mb else "")


EndpointSpec = str | tuple[str, str | None] | Endpoint | Vectors


def install_mysql_functions(
    url: str, functions: Iterable[SqlFunction], endpoints: Mapping[str, EndpointSpec]
) -> str:
    """Build, install and create `functions` in the URL's database; returns a summary line."""
    functions = list(functions)
    conn = mysql_connect(url, connect_timeout=5)
    try:
        allow_list = install_udf(conn, endpoints, functions)
        created = create_functions(conn, functions)
    finally:
        conn.close()
    return f"created {', '.join(created)}; endpoints in {allow_list}"


def install_in_server(
    url: str,
    functions: Iterable[SqlFunction],
    model_dir: Path,
    vectors_path: Path = DEFAULT_VECTORS_DIR / "recsql.vectors",
    *,
    fallback: str = "null",
    max_mb: int | None = None,
) -> str:
    """Export `model_dir` to a vectors file and install `functions` to score from it in
    the server: every endpoint they name maps to that file. Re-running replaces the
    file atomically (the next statement uses the new model)."""
    from db.vectors import export_vectors

    functions = list(functions)
    vectors_path = Path(vectors_path).absolute()
    info = export_vectors(model_dir, vectors_path, fallback)
    entry = Vectors(vectors_path, max_mb)
    summary = install_mysql_functions(url, functions, {f.endpoint: entry for f in functions})
    return (
        f"{summary}; in-server model {vectors_path} ({info.users} users, {info.items} items, "
        f"dim {info.dim}, {info.bytes / 1e6:.1f} MB, fallback {fallback})"
    )


def build_udf(source_dir: Path = UDF_SOURCE_DIR, build_dir: Path | None = None) -> Path:
    """Compile recsql_udf.so with make (gcc + libcurl); returns its path.

    Builds in `source_dir` unless `build_dir` is given or `source_dir` is read-only
    (an installed package), in which case the sources are copied there first.
    """
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "gcc")) is None:
        raise RecsqlError("building the MariaDB function needs make and gcc")
    if build_dir is None and not os.access(source_dir, os.W_OK):
        build_dir = Path(tempfile.gettempdir()) / "recsql-udf-build"
    if build_dir is not None and Path(build_dir) != source_dir:
        shutil.copytree(
            source_dir, build_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.so", "*.o")
        )
        source_dir = Path(build_dir)
    result = subprocess.run(
        ["make", "-C", str(source_dir), "--no-print-directory"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["make failed"])[-1]
        hint = " (install libcurl4-openssl-dev)" if "curl" in result.stderr else ""
        raise RecsqlError(f"building {SONAME} failed: {reason}{hint}")
    return source_dir / SONAME


def install_udf(
    conn: pymysql.Connection,
    endpoints: Mapping[str, EndpointSpec],
    functions: Iterable[SqlFunction] = DEFAULT_FUNCTIONS,
    *,
    so_path: Path | None = None,
    allow_list: Path | None = None,
) -> Path:
    """Copy the .so into plugin_dir, register it, write the allow-list; returns its path.

    `endpoints` maps endpoint names (SqlFunction.endpoint) to a URL, a
    (URL, target_model) pair or an Endpoint. Entries already in the allow-list
    for other names are kept. Safe to run again.
    """
    plugin_dir = _local_plugin_dir(conn)
    so_path = Path(so_path) if so_path else build_udf()
    changed = _copy_if_changed(so_path, plugin_dir / SONAME)
    register_udf(conn, force=changed)
    path = Path(allow_list) if allow_list else allow_list_path(conn)
    write_allow_list(path, allow_list_entries(endpoints, functions))
    log.info("installed %s into %s; allow-list %s", SONAME, plugin_dir, path)
    return path


def register_udf(conn: pymysql.Connection, *, force: bool = False) -> None:
    """CREATE FUNCTION ... SONAME for each loadable function (re-created when `force`)."""
    with conn.cursor() as cur:
        names = list(LOADABLE_FUNCTIONS)
        cur.execute(
            f"SELECT name, dl FROM mysql.func WHERE name IN ({', '.join(['%s'] * len(names))})",
            names,
        )
        registered = {name: dl for name, dl in cur.fetchall()}
        if not force and all(registered.get(n) == SONAME for n in LOADABLE_FUNCTIONS):
            return
        # Dropping every function of the .so lets the server dlclose the old file.
        for name in LOADABLE_FUNCTIONS:
            if name in registered:
                cur.execute(f"DROP FUNCTION {name}")
        for name, returns in LOADABLE_FUNCTIONS.items():
            cur.execute(f"CREATE FUNCTION {name} RETURNS {returns} SONAME '{SONAME}'")


def uninstall_udf(conn: pymysql.Connection) -> None:
    """Drop the loadable functions (the .so and the allow-list stay in place)."""
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM mysql.func WHERE dl = %s", (SONAME,))
        for (name,) in cur.fetchall():
            cur.execute(f"DROP FUNCTION `{name}`")


def allow_list_path(conn: pymysql.Connection) -> Path:
    """The allow-list file the server's recsql_udf.so reads."""
    with conn.cursor() as cur:
        cur.execute("SELECT recsql_endpoints_path()")
        (path,) = cur.fetchone()
    return Path(path.decode() if isinstance(path, bytes) else path)


def allow_list_name(function: SqlFunction) -> str:
    """The allow-list name a function calls: its endpoint, endpoint.events for an events
    function (short timeouts), or endpoint.function when it has its own target model (one
    line per distinct URL + target model)."""
    if function.score == "events":
        return function.endpoint + EVENTS_SUFFIX
    if function.target_model is None:
        return function.endpoint
    return f"{function.endpoint}.{function.name}"


def allow_list_entries(
    endpoints: Mapping[str, EndpointSpec], functions: Iterable[SqlFunction]
) -> dict[str, Endpoint | Vectors]:
    entries = {name: _endpoint(spec) for name, spec in endpoints.items()}
    for function in functions:
        if function.endpoint not in entries:
            raise DataError(
                f"function {function.name} uses endpoint {function.endpoint!r}, "
                f"which has no URL (given: {sorted(entries) or 'none'})"
            )
        base = entries[function.endpoint]
        if function.score == "events":
            if isinstance(base, Vectors):
                raise DataError(
                    f"function {function.name} sends events; endpoint {function.endpoint!r}"
                    " is a vectors file (in-server scoring), which takes none: give it a URL"
                )
            entries[allow_list_name(function)] = Endpoint(
                base.url,
                function.target_model or base.target_model,
                min(base.timeout_ms or EVENT_TIMEOUT_MS, EVENT_TIMEOUT_MS),
                min(base.connect_timeout_ms or EVENT_CONNECT_TIMEOUT_MS, EVENT_CONNECT_TIMEOUT_MS),
            )
        elif function.target_model is not None:
            if isinstance(base, Vectors):
                raise DataError(
                    f"function {function.name} names a target model; endpoint "
                    f"{function.endpoint!r} is a vectors file, which holds one model"
                )
            entries[allow_list_name(function)] = Endpoint(
                base.url, function.target_model, base.timeout_ms, base.connect_timeout_ms
            )
    return entries


def read_allow_list(path: Path) -> dict[str, str]:
    """name -> the whole line, for the entries of an existing allow-list file."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    lines = (line.strip() for line in text.splitlines())
    return {line.split()[0]: line for line in lines if line and not line.startswith("#")}


def write_allow_list(
    path: Path, entries: Mapping[str, Endpoint | Vectors], *, remove: Iterable[str] = ()
) -> None:
    """Add or replace `entries` and drop `remove` in the allow-list, atomically (mode 0644).

    The server re-reads the file at the start of the next statement that calls it.
    """
    path = Path(path)
    lines = read_allow_list(path)
    for name in remove:
        lines.pop(name, None)
    lines.update({name: endpoint.line(name) for name, endpoint in entries.items()})
    header = (
        "# recsql endpoint allow-list: name URL [target_model] [timeout_ms=N] "
        "[connect_timeout_ms=N]\n#   or: name file:///path/to/model.vectors [max_mb=N]\n"
        "# Written by recsql (db/mysql_udf.py); read by recsql_udf.so.\n"
    )
    body = header + "".join(line + "\n" for line in lines.values())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".recsql-endpoints.")
        with os.fdopen(fd, "w") as out:
            out.write(body)
        os.chmod(tmp, 0o644)  # the server (user mysql) reads it; only root writes it
        os.replace(tmp, path)
    except OSError as exc:
        raise RecsqlError(f"cannot write the allow-list {path}: {exc.strerror}") from exc


def loadable_function(function: SqlFunction) -> str:
    """The loadable function a SQL function calls: recsql_similar for product similarity
    (score=similar over HTTP, the cosine in-server), else recsql_invoke(_str)."""
    if function.score == "similar":
        return "recsql_similar"
    if function.score == "events":
        return "recsql_session_event" if function.event_key == "session_id" else "recsql_event"
    return "recsql_invoke_str" if function.returns_text else "recsql_invoke"


def function_ddl(
    function: SqlFunction,
    *,
    strict: bool = False,
    name: str | None = None,
    database: str | None = None,
) -> str:
    """CREATE FUNCTION for one SqlFunction: lenient (NULL on failure) or strict (SIGNAL)."""
    name = name or function.name + (STRICT_SUFFIX if strict else "")
    qualified = f"{_quote_ident(database)}.{_quote_ident(name)}" if database else _quote_ident(name)
    params = ", ".join(f"{_quote_ident(a.name)} {_param_type(a.sql_type)}" for a in function.args)
    returns = _param_type(function.returns)
    udf = loadable_function(function)
    args = ", ".join(_quote_ident(a.name) for a in function.args)
    call = f"{udf}({_literal(allow_list_name(function))}, {args})"
    if strict and function.score == "events":
        raise DataError(f"{function.name}: an events function has no strict form (see module)")
    policy = "raises on endpoint failure" if strict else "NULL on endpoint failure"
    if function.score == "events":
        policy = "never raises: 1 taken, 0 rejected, NULL not sent"
    comment = _literal(f"{function.description} [recsql; {policy}]".strip())
    head = (
        f"CREATE FUNCTION {qualified}({params}) RETURNS {returns}\n"
        f"  NOT DETERMINISTIC NO SQL\n  COMMENT {comment}\n"
    )
    if not strict:
        return head + f"  RETURN {call}"
    return head + (
        "BEGIN\n"
        f"  DECLARE recsql_result {returns} DEFAULT {call};\n"
        "  DECLARE recsql_failure VARCHAR(128) DEFAULT recsql_last_error();\n"
        "  IF recsql_failure IS NOT NULL THEN\n"
        "    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = recsql_failure;\n"
        "  END IF;\n"
        "  RETURN recsql_result;\n"
        "END"
    )


def event_trigger_ddl(
    table: str,
    function: SqlFunction,
    columns: Mapping[str, str] | None = None,
    *,
    name: str | None = None,
) -> str:
    """CREATE TRIGGER <table>_recsql_events AFTER INSERT ON <table> FOR EACH ROW DO
    <function>(NEW.<who>, NEW.product_id, NEW.event_type, NEW.event_time). `columns` maps
    the function's arguments to other column names; a missing one is passed as NULL when
    mapped to "" (e.g. no event_type column: every row a view)."""
    if function.score != "events":
        raise DataError(f"{function.name} is not an events function")
    columns = dict(columns or {})
    args = []
    for arg in function.args:
        column = columns.get(arg.name, arg.name)
        args.append(f"NEW.{_quote_ident(column)}" if column else "NULL")
    trigger = name or f"{table}_recsql_events"
    if not re.match(r"^[A-Za-z0-9_$]{1,64}$", trigger) or not _DATABASE.match(table):
        raise DataError(f"unsupported table or trigger name {table!r} / {trigger!r}")
    return (
        f"CREATE TRIGGER {_quote_ident(trigger)} AFTER INSERT ON {_quote_ident(table)}"
        f" FOR EACH ROW DO {_quote_ident(function.name)}({', '.join(args)})"
    )


def create_functions(
    conn: pymysql.Connection,
    functions: Iterable[SqlFunction] = DEFAULT_FUNCTIONS,
    *,
    database: str | None = None,
    strict: bool = True,
) -> list[str]:
    """(Re)create each function, and its `<name>_strict` twin when `strict`; returns names."""
    database = _database(conn, database)
    functions = list(functions)
    needed = {"recsql_last_error", *(loadable_function(f) for f in functions)}
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT name FROM mysql.func WHERE name IN ({', '.join(['%s'] * len(needed))})",
            sorted(needed),
        )
        if len(cur.fetchall()) < len(needed):
            raise RecsqlError("the recsql loadable functions are not registered: run install_udf")
        created = []
        for function in functions:
            twins = strict and function.score != "events"
            for is_strict in (False, True) if twins else (False,):
                name = function.name + (STRICT_SUFFIX if is_strict else "")
                if len(name) > 64:
                    raise DataError(f"function name {name!r} is longer than 64 characters")
                cur.execute(
                    f"DROP FUNCTION IF EXISTS {_quote_ident(database)}.{_quote_ident(name)}"
                )
                cur.execute(function_ddl(function, strict=is_strict, database=database))
                created.append(f"{database}.{name}")
    return created


def drop_functions(
    conn: pymysql.Connection,
    functions: Iterable[SqlFunction] = DEFAULT_FUNCTIONS,
    *,
    database: str | None = None,
) -> None:
    """Drop the SQL functions (and their _strict twins) created by create_functions."""
    database = _database(conn, database)
    with conn.cursor() as cur:
        for function in functions:
            for name in (function.name, function.name + STRICT_SUFFIX):
                cur.execute(
                    f"DROP FUNCTION IF EXISTS {_quote_ident(database)}.{_quote_ident(name)}"
                )


def _endpoint(spec: EndpointSpec) -> Endpoint | Vectors:
    if isinstance(spec, Endpoint | Vectors):
        return spec
    if isinstance(spec, str):
        return Endpoint(spec)
    url, target_model = spec
    return Endpoint(url, target_model)


def _local_plugin_dir(conn: pymysql.Connection) -> Path:
    with conn.cursor() as cur:
        cur.execute("SELECT @@plugin_dir")
        (plugin_dir,) = cur.fetchone()
    plugin_dir = Path(plugin_dir.decode() if isinstance(plugin_dir, bytes) else plugin_dir)
    host = (getattr(conn, "host", "") or "").lower()
    if getattr(conn, "unix_socket", None) is None and host not in _LOCAL_HOSTS:
        raise RecsqlError(
            f"the server at {host} is not on this machine: copy {SONAME} into its plugin_dir "
            f"({plugin_dir}) and write its allow-list there (see README, 'MariaDB/MySQL')"
        )
    if not plugin_dir.is_dir() or not os.access(plugin_dir, os.W_OK):
        raise RecsqlError(
            f"plugin_dir {plugin_dir} is not a directory this user can write "
            f"(run as root, or copy {SONAME} there by hand)"
        )
    return plugin_dir


def _copy_if_changed(source: Path, target: Path) -> bool:
    if target.exists() and target.read_bytes() == source.read_bytes():
        return False
    # A new inode via rename: the server may still have the old file mapped.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".recsql_udf.")
    with os.fdopen(fd, "wb") as out:
        out.write(source.read_bytes())
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return True


def _database(conn: pymysql.Connection, database: str | None) -> str:
    if database is None:
        with conn.cursor() as cur:
            cur.execute("SELECT DATABASE()")
            (database,) = cur.fetchone()
    if not database:
        raise DataError("no database selected: pass database=... or connect to one")
    if not _DATABASE.match(database):
        raise DataError(f"unsupported database name {database!r}")
    return database


def _param_type(sql_type: str) -> str:
    text = " ".join(sql_type.split())
    if not _TYPE.match(text):
        raise DataError(f"unsupported SQL type {sql_type!r}")
    if text.upper() == "VARCHAR":
        return "TEXT CHARSET utf8mb4"
    if text.upper().startswith(("VARCHAR", "TEXT")):
        return f"{text} CHARSET utf8mb4"
    return text


def _quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _literal(text: str) -> str:
    # Printable ASCII only and no backslash, so the result means the same with or
    # without NO_BACKSLASH_ESCAPES.
    clean = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)
    return "'" + clean.replace("'", "''") + "'"
