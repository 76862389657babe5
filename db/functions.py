"""One definition per SQL function; every engine's DDL is generated from it.

A function names an endpoint (never a URL): Aurora resolves the name to a
SageMaker endpoint, the MariaDB/MySQL loadable function resolves it through a
server-side allow-list file, DuckDB through the endpoints the caller configured.

What a function scores is its `score`: "pair" sends its arguments as a CSV record the
model scores (a user and a product, a tabular row); "similar" sends two product ids with
`X-Amzn-SageMaker-Custom-Attributes: score=similar`, and the endpoint answers their
cosine (MariaDB/MySQL: the loadable function `recsql_similar`, which scores in-server
from a vectors file too). Aurora cannot send that header, so it has no "similar" function.

"events" scores nothing: it sends its row (who, product_id, event_type, event_time) to the
endpoint's fresh-event store as `{"events": [...]}` (serve/events.py) and returns 1 when
the server took it, 0 when it rejected it (a 400: a bad row), NULL when it was not sent (a
NULL id) or not delivered. Its first argument is named `user_id`, or `session_id` for a
visitor: that name is the key the event goes under. See db/events.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import DataError
from model.variants import SAGEMAKER_NAME

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
SCORES = ("pair", "similar", "events")
EVENT_KEYS = ("user_id", "session_id")  # an events function's first argument
SQL_TYPES = ("BIGINT", "INT", "INTEGER", "DOUBLE", "FLOAT", "DECIMAL", "VARCHAR", "TEXT")
# The whole type must match: it is written into DDL, so nothing may follow it.
_TYPE = re.compile(
    r"^(" + "|".join(SQL_TYPES) + r")(\(\s*\d{1,5}\s*(,\s*\d{1,2}\s*)?\))?(\s+UNSIGNED)?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Argument:
    name: str
    sql_type: str  # e.g. BIGINT, DOUBLE, VARCHAR(64)

    def __post_init__(self) -> None:
        if not _IDENT.match(self.name):
            raise DataError(f"bad argument name {self.name!r}")
        if not _TYPE.match(" ".join(self.sql_type.split())):
            raise DataError(f"argument {self.name}: unsupported type {self.sql_type!r}")


@dataclass(frozen=True)
class SqlFunction:
    name: str
    args: tuple[Argument, ...]
    returns: str = "FLOAT"  # numeric, or VARCHAR(n) (utf8mb4 on Aurora)
    endpoint: str = "recsql"
    target_model: str | None = None  # multi-model endpoints: X-Amzn-SageMaker-Target-Model
    max_batch_size: int = 10000
    description: str = field(default="", compare=False)
    score: str = "pair"  # "similar": (product, product) -> cosine; see the module docstring

    def __post_init__(self) -> None:
        if not _IDENT.match(self.name):
            raise DataError(f"bad function name {self.name!r}")
        if not SAGEMAKER_NAME.match(self.endpoint):
            raise DataError(f"function {self.name}: bad endpoint name {self.endpoint!r}")
        if not 1 <= self.max_batch_size <= 10000:
            raise DataError(f"function {self.name}: max_batch_size must be 1..10000")
        if self.score not in SCORES:
            raise DataError(f"function {self.name}: score must be one of {', '.join(SCORES)}")
        if self.score == "similar" and (len(self.args) != 2 or self.returns_text):
            raise DataError(
                f"function {self.name}: a similar function takes two product ids and returns"
                " a number"
            )
        if self.score == "events" and (
            [a.name for a in self.args[1:]] != ["product_id", "event_type", "event_time"]
            or self.args[0].name not in EVENT_KEYS
            or self.returns.upper() not in ("INT", "INTEGER", "BIGINT")
        ):
            raise DataError(
                f"function {self.name}: an events function takes (user_id or session_id,"
                " product_id, event_type, event_time) and returns INT"
            )

    @property
    def returns_text(self) -> bool:
        return self.returns.upper().startswith(("VARCHAR", "TEXT"))

    @property
    def custom_attributes(self) -> str | None:
        """The X-Amzn-SageMaker-Custom-Attributes its requests carry (None: none)."""
        return "score=similar" if self.score == "similar" else None

    @property
    def event_key(self) -> str | None:
        """An events function: the field its first argument fills (user_id or session_id)."""
        return self.args[0].name if self.score == "events" else None


WILL_PURCHASE = SqlFunction(
    "will_purchase",
    (Argument("user_id", "BIGINT"), Argument("product_id", "BIGINT")),
    "FLOAT",
    description="MFBlock score of a (user, product) pair; NULL when either id is unknown.",
)

SIMILAR_SCORE = SqlFunction(
    "similar_score",
    (Argument("product_a", "BIGINT"), Argument("product_b", "BIGINT")),
    "FLOAT",
    description="Cosine of two products' MFBlock item vectors (0..1); NULL when either is unknown.",
    score="similar",
)

# The bank-marketing tabular model (tests/data/bank-full.csv.gz, target y) on a
# multi-model endpoint. Arguments follow the model's feature order, since the
# CSV row is positional; only their names differ from the columns where SQL
# reserves the word (`default` -> has_default). Not installed by default.
WILL_SUBSCRIBE = SqlFunction(
    "will_subscribe",
    (
        Argument("age", "BIGINT"),
        Argument("job", "VARCHAR(32)"),
        Argument("marital", "VARCHAR(16)"),
        Argument("education", "VARCHAR(16)"),
        Argument("has_default", "VARCHAR(8)"),
        Argument("balance", "BIGINT"),
        Argument("housing", "VARCHAR(8)"),
        Argument("loan", "VARCHAR(8)"),
        Argument("contact", "VARCHAR(16)"),
        Argument("day", "BIGINT"),
        Argument("month", "VARCHAR(8)"),
        Argument("duration", "BIGINT"),
        Argument("campaign", "BIGINT"),
        Argument("pdays", "BIGINT"),
        Argument("previous", "BIGINT"),
        Argument("poutcome", "VARCHAR(16)"),
    ),
    "FLOAT",
    target_model="bank",
    description="P(the client subscribes a term deposit), bank tabular model; NULL: bad row.",
)

DEFAULT_FUNCTIONS: tuple[SqlFunction, ...] = (WILL_PURCHASE, SIMILAR_SCORE)


# Fresh events from SQL (db/events.py): `INSERT ... SELECT ..., record_event(...)` in DuckDB,
# an AFTER INSERT trigger on MariaDB/MySQL. event_time: a timestamp (UTC) or NULL (now);
# event_type: view, cart, purchase, remove_from_cart or NULL (view).
def _events_function(name: str, key: str, whose: str) -> SqlFunction:
    return SqlFunction(
        name,
        (
            Argument(key, "BIGINT"),
            Argument("product_id", "BIGINT"),
            Argument("event_type", "VARCHAR(32)"),
            Argument("event_time", "VARCHAR(64)"),
        ),
        "INT",
        max_batch_size=2048,
        description=f"Send {whose} event to the endpoint's fresh-event store: 1 taken,"
        " 0 rejected, NULL not sent.",
        score="events",
    )


RECORD_EVENT = _events_function("record_event", "user_id", "a user's")
RECORD_SESSION_EVENT = _events_function(
    "record_session_event", "session_id", "a visitor's (session id)"
)
EVENT_FUNCTIONS: tuple[SqlFunction, ...] = (RECORD_EVENT, RECORD_SESSION_EVENT)


def load_functions(path: Path) -> list[SqlFunction]:
    """Read function definitions from JSON: a list of
    {"name", "args": [[name, type], ...], "returns", "endpoint", "target_model", "max_batch_size",
    "score"}.
    """
    try:
        items = json.loads(Path(path).read_text())
        return [
            SqlFunction(
                name=item["name"],
                args=tuple(Argument(n, t) for n, t in item["args"]),
                returns=item.get("returns", "FLOAT"),
                endpoint=item.get("endpoint", "recsql"),
                target_model=item.get("target_model"),
                max_batch_size=int(item.get("max_batch_size", 10000)),
                description=item.get("description", ""),
                score=item.get("score", "pair"),
            )
            for item in items
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: cannot read function definitions ({exc})") from exc
