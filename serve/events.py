"""Fresh events: what users did after the model was trained, taken over HTTP and read back
whenever those users are scored.

    {"events": [{"user_id": 512206764, "product_id": 1072155, "event_type": "cart",
                 "event_time": "2019-11-02 10:00:00 UTC"},
                {"session_id": -77, "product_id": 1091566}, ...]}

posted to /invocations (the one route SageMaker sends a container) or /events. Every entry
is checked first; one bad entry is a 400 naming each bad entry, and nothing is taken. A
visitor's `session_id` is stored like a user id and scored by passing it as `user_id`.

Stores (RECSQL_EVENTS_URL): `sqlite:///path` (the default: a WAL-mode file under the
server's state dir, shared by its workers), `redis://host:port/db` (several instances:
ElastiCache), `off`. Per user the store keeps the last `keep` events, 17 bytes each
(product id, time, type), and forgets a user `ttl` seconds after their latest event. The
store is the one truth every worker reads at scoring time: no worker caches events; a
worker that found the store empty (or down) asks again after RECHECK_SECONDS.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from model.errors import BadRequest, RecsqlError, first_line
from model.history import TYPE_CODES, RecentEvents
from serve.history import FIELDS as EVENT_FIELDS
from serve.history import event_seconds, is_id, parse_event

log = logging.getLogger("recsql.serve")

# One stored event: 17 bytes, little-endian, no padding.
EVENT = np.dtype([("product_id", "<i8"), ("event_time", "<i8"), ("event_type", "u1")])
DEFAULT_KEEP = 200  # the history models' default recent_events
DEFAULT_TTL = 30 * 86400
RECHECK_SECONDS = 0.5  # an empty or failed store is asked again after this long
TIMEOUT_SECONDS = 0.1  # Redis connect and read timeouts: a dead Redis must not stall scoring
MAX_LISTED = 10  # bad entries named in one 400
LOCK_WAIT_SECONDS = 2.0  # how long a SQLite append waits for another worker's write
LOCK_WAIT_STEP = 0.0002
PURGE_SECONDS = 60.0  # how often a process's SQLite appends also delete expired users
_WHO = ("user_id", "session_id")
_FIELDS = (*_WHO, *EVENT_FIELDS)
_FIELD_SET = frozenset(_FIELDS)


class EventStoreUnavailable(RecsqlError):
    status = 503


@dataclass(frozen=True)
class EventBatch:
    """Events of a request, in request order: who did each and the packed event."""

    user_ids: np.ndarray  # int64
    events: np.ndarray  # EVENT records

    def by_user(self) -> dict[int, bytes]:
        """Each user's events packed back to back, in request order."""
        order = np.argsort(self.user_ids, kind="stable")
        users, starts = np.unique(self.user_ids[order], return_index=True)
        packed = self.events[order].tobytes()
        ends = [*starts[1:].tolist(), len(order)]
        size = EVENT.itemsize
        return {
            int(u): packed[s * size : e * size]
            for u, s, e in zip(users.tolist(), starts.tolist(), ends, strict=True)
        }


def parse_events(value: Any, now: int) -> EventBatch:
    """The `events` list, every entry checked; an event without event_time happened `now`.
    Any bad entry: BadRequest naming each (up to MAX_LISTED) with its reason."""
    if not isinstance(value, list) or not value:
        raise BadRequest('"events" must be a non-empty list of event objects')
    users, products, times, types, errors = [], [], [], [], []
    for n, entry in enumerate(value):
        try:
            user, product, kind, when = _entry(entry, n)
        except BadRequest as exc:
            errors.append(str(exc))
            continue
        users.append(user)
        products.append(product)
        types.append(kind)
        times.append(now if when is None else when)
    if errors:
        more = f"; and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise BadRequest(
            f"events: nothing taken, {len(errors)} of {len(value)} entries rejected: "
            + "; ".join(errors[:MAX_LISTED])
            + more
        )
    events = np.empty(len(users), EVENT)
    events["product_id"], events["event_time"], events["event_type"] = products, times, types
    return EventBatch(np.array(users, np.int64), events)


def _entry(entry: Any, n: int) -> tuple[int, int, int, int | None]:
    """(user, product, event type code, epoch seconds or None) of the n-th entry. The
    common plain entry is read at once; anything else goes the long way, which says what
    is wrong (a third of the cost of taking 10 events was these checks)."""
    if type(entry) is dict and entry.keys() <= _FIELD_SET:
        user, product = entry.get("user_id", entry.get("session_id")), entry.get("product_id")
        kind = entry.get("event_type", "view")
        one_who = ("user_id" in entry) != ("session_id" in entry)
        if one_who and is_id(user) and is_id(product) and type(kind) is str and kind in TYPE_CODES:
            when = entry.get("event_time")
            where = f"entry {n + 1}"
            return (
                user,
                product,
                TYPE_CODES[kind],
                None if when is None else event_seconds(when, where),
            )
    where = f"entry {n + 1}"
    return _who(entry, where), *parse_event(_what(entry), where)


def _who(entry: Any, where: str) -> int:
    if not isinstance(entry, dict):
        raise BadRequest(f"{where}: expected an object with user_id (or session_id), product_id")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise BadRequest(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(_FIELDS)})")
    given = [k for k in _WHO if k in entry]
    if len(given) != 1:
        raise BadRequest(f"{where}: give user_id or session_id (exactly one)")
    user = entry[given[0]]
    if not is_id(user):
        raise BadRequest(f"{where}: {given[0]} must be an integer id, not {user!r}")
    return int(user)


def _what(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in _WHO}


def as_recent_events(
    fresh: dict[int, np.ndarray], product_rows: Any
) -> tuple[np.ndarray, RecentEvents]:
    """Looked-up events as model input: the user ids and their events (product rows from
    `product_rows(ids)`, -1 unknown), row r being user_ids[r], each in time order."""
    user_ids = np.fromiter(fresh, np.int64, len(fresh))
    records = list(fresh.values())
    counts = [len(r) for r in records]
    events = np.concatenate(records)
    return user_ids, RecentEvents.build(
        np.repeat(np.arange(len(records)), counts),
        np.asarray(product_rows(events["product_id"]), np.int32),
        events["event_type"],
        events["event_time"],
        len(records),
    )


class EventStore(ABC):
    """Each user's last `keep` events; a user is forgotten `ttl` seconds after their latest."""

    def __init__(self, url: str, keep: int, ttl: int) -> None:
        self.url, self.keep, self.ttl = url, keep, ttl

    @abstractmethod
    def append(self, batch: EventBatch) -> None:
        """Take every event of the batch, or none (EventStoreUnavailable)."""

    @abstractmethod
    def recent(self, user_ids: Sequence[int]) -> dict[int, bytes]:
        """The packed events (oldest taken first) of those of `user_ids` the store holds;
        raises when the store cannot be read."""

    @abstractmethod
    def any(self) -> bool:
        """Whether the store holds any user at all."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


class SqliteStore(EventStore):
    """One row per user (id, packed events, expiry) in a WAL-mode SQLite file: readers never
    wait for the writer, and the workers of one host share it. `sqlite://` alone: in memory,
    one process (tests, in-process use)."""

    def __init__(self, url: str, keep: int, ttl: int) -> None:
        super().__init__(url, keep, ttl)
        self.path = urlsplit(url).path or ":memory:"
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._next_purge = 0.0

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never share one across a fork
            # No busy_timeout: SQLite's own wait sleeps 1, 2, 5, ... ms without yielding,
            # which stalls a whole gevent worker; _locked waits in 0.2 ms steps instead.
            conn = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            _locked(conn, "PRAGMA journal_mode = WAL")
            _locked(conn, "PRAGMA synchronous = NORMAL")
            _locked(
                conn,
                "CREATE TABLE IF NOT EXISTS events (user_id INTEGER PRIMARY KEY,"
                " data BLOB NOT NULL, expires REAL NOT NULL)",
            )
            _locked(conn, "CREATE INDEX IF NOT EXISTS events_expires ON events (expires)")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def append(self, batch: EventBatch) -> None:
        new, now = batch.by_user(), time.time()
        try:
            conn = self._connection()
            _locked(conn, "BEGIN IMMEDIATE")
            try:
                old = dict(
                    conn.execute(
                        "SELECT user_id, data FROM events WHERE user_id IN"
                        " (SELECT value FROM json_each(?)) AND expires > ?",
                        (json.dumps(list(new)), now),
                    )
                )
                last, expires = self.keep * EVENT.itemsize, now + self.ttl
                conn.executemany(
                    "INSERT OR REPLACE INTO events VALUES (?, ?, ?)",
                    [(u, (old.get(u, b"") + data)[-last:], expires) for u, data in new.items()],
                )
                if now >= self._next_purge:  # expired rows are never read: no hurry
                    conn.execute("DELETE FROM events WHERE expires <= ?", (now,))
                    self._next_purge = now + PURGE_SECONDS
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _unavailable(self.url, exc) from exc

    def recent(self, user_ids: Sequence[int]) -> dict[int, bytes]:
        conn, now = self._connection(), time.time()
        if len(user_ids) == 1:
            query = "SELECT user_id, data FROM events WHERE user_id = ? AND expires > ?"
            return dict(_locked(conn, query, (user_ids[0], now)))
        query = (
            "SELECT user_id, data FROM events WHERE user_id IN"
            " (SELECT value FROM json_each(?)) AND expires > ?"
        )
        return dict(_locked(conn, query, (json.dumps(list(user_ids)), now)))

    def any(self) -> bool:
        query = "SELECT EXISTS (SELECT 1 FROM events WHERE expires > ?)"
        return bool(_locked(self._connection(), query, (time.time(),)).fetchone()[0])

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


# A request's events in one atomic command: per user key RPUSH its events (ARGV[3 + i]: the
# user's 17-byte events back to back), LTRIM to the last `keep`, EXPIRE; then the marker.
# (The same commands pipelined in a MULTI cost 3x the CPU: redis-py packs and parses
# each of them in Python.)
_APPEND = """
local keep, ttl, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, #KEYS - 1 do
  local data, items = ARGV[i + 3], {}
  for at = 1, #data, size do
    items[#items + 1] = string.sub(data, at, at + size - 1)
    if #items == 1000 then
      redis.call('RPUSH', KEYS[i], unpack(items))
      items = {}
    end
  end
  if #items > 0 then redis.call('RPUSH', KEYS[i], unpack(items)) end
  redis.call('LTRIM', KEYS[i], -keep, -1)
  redis.call('EXPIRE', KEYS[i], ttl)
end
redis.call('SET', KEYS[#KEYS], '1', 'EX', ttl)
return #KEYS - 1
"""


class RedisStore(EventStore):
    """One Redis list per user (`{prefix}{user id}`, one 17-byte element per event): RPUSH,
    LTRIM to the last `keep` and EXPIRE for every user of a request in one Lua script
    (atomic, one round trip); a batch of users is read in one pipelined round trip.
    `{prefix}any` exists while any user does."""

    def __init__(self, url: str, keep: int, ttl: int, prefix: str) -> None:
        super().__init__(url, keep, ttl)
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.prefix, self.marker = prefix, f"{prefix}any"
        # redis-py's pool notices a fork and reconnects in the child: safe to build here.
        self.client = redis.Redis.from_url(
            url,
            socket_connect_timeout=TIMEOUT_SECONDS,
            socket_timeout=TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        )
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._append = self.client.register_script(_APPEND)  # EVALSHA, EVAL once if unknown

    def append(self, batch: EventBatch) -> None:
        users = batch.by_user()
        last = self.keep * EVENT.itemsize  # what the LTRIM keeps of a user's new events
        keys = [f"{self.prefix}{user}" for user in users] + [self.marker]
        data = [packed[-last:] for packed in users.values()]
        try:
            self._append(keys=keys, args=[self.keep, self.ttl, EVENT.itemsize, *data])
        except self._errors as exc:
            raise _unavailable(self.url, exc) from exc

    def recent(self, user_ids: Sequence[int]) -> dict[int, bytes]:
        if len(user_ids) == 1:  # one command: a third cheaper than a pipeline of one
            lists = [self.client.lrange(f"{self.prefix}{user_ids[0]}", 0, -1)]
        else:
            pipe = self.client.pipeline(transaction=False)
            for user in user_ids:
                pipe.lrange(f"{self.prefix}{user}", 0, -1)
            lists = pipe.execute()
        return {u: b"".join(v) for u, v in zip(user_ids, lists, strict=True) if v}

    def any(self) -> bool:
        return bool(self.client.exists(self.marker))

    def close(self) -> None:
        self.client.close()


def _locked(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
    """conn.execute(sql, params), waiting while another worker holds a lock it needs: in
    LOCK_WAIT_STEP sleeps (greenlet-friendly under gevent), for up to LOCK_WAIT_SECONDS."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return conn.execute(sql, params)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(LOCK_WAIT_STEP)


def _unavailable(url: str, exc: Exception) -> EventStoreUnavailable:
    reason = first_line(exc)
    return EventStoreUnavailable(
        f"event store {redact(url)} unavailable ({reason}): no events taken; scores come from"
        " the model alone until it is back"
    )


def redact(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username or ''}:***@{netloc}").geturl()


def open_store(url: str, keep: int, ttl: int, prefix: str) -> EventStore:
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SqliteStore(url, keep, ttl)
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, keep, ttl, prefix)
    raise RecsqlError(f"RECSQL_EVENTS_URL {redact(url)!r}: use sqlite:///path, redis://... or off")


class FreshEvents:
    """One process's access to the store: takes events (all or nothing) and looks users up
    for scoring, where a store that is empty, or down, costs nothing and fails nothing."""

    def __init__(self, url: str | None, keep: int, ttl: int, prefix: str) -> None:
        self.url, self.keep, self.ttl, self.prefix = url, keep, ttl, prefix
        self._store: EventStore | None = None
        self._quiet_until = 0.0  # the store was empty or down: skip lookups until then
        self._next_any = 0.0  # when to ask again whether the store holds anyone at all
        self._down_logged = 0.0

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def store(self) -> EventStore:
        if self.url is None:
            raise BadRequest("fresh events are off on this server (RECSQL_EVENTS_URL=off)")
        if self._store is None:
            self._store = open_store(self.url, self.keep, self.ttl, self.prefix)
        return self._store

    def take(self, value: Any) -> dict[str, int]:
        """Check then store the `events` of a request: {"taken": events, "users": users}."""
        store = self.store()
        batch = parse_events(value, int(time.time()))
        store.append(batch)
        self._quiet_until = self._next_any = 0.0  # this worker sees them at once
        return {"taken": len(batch.user_ids), "users": len(np.unique(batch.user_ids))}

    def lookup(self, user_ids: np.ndarray) -> dict[int, np.ndarray]:
        """user id -> their stored events (EVENT records, in time order; ties in the order
        taken), for those of `user_ids` that have any; {} when the store is down."""
        now = time.monotonic()
        if self.url is None or now < self._quiet_until or not len(user_ids):
            return {}
        try:
            store = self.store()
            if now >= self._next_any:  # at most once per RECHECK_SECONDS
                self._next_any = now + RECHECK_SECONDS
                if not store.any():
                    self._quiet_until = self._next_any
                    return {}
            found = store.recent(np.unique(user_ids).tolist())
        except Exception as exc:  # a dead store never fails scoring
            self._quiet_until = now + RECHECK_SECONDS
            if now - self._down_logged > 10:
                self._down_logged = now
                log.warning(
                    "event store %s unreadable, scoring without it: %s",
                    redact(self.url),
                    first_line(exc),
                )
            return {}
        out = {}
        for user, data in found.items():
            events = np.frombuffer(data, EVENT)
            out[int(user)] = events[np.argsort(events["event_time"], kind="stable")]
        return out

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
