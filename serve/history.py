"""The `history` option: a user's recent events, as a request sends them.

    {"history": [1, 2, 3], "top_k": 10}                      product ids, oldest first: views
    {"history": [{"product_id": 1, "event_type": "cart",
                  "event_time": "2019-11-02 10:00:00 UTC"}, ...], "top_k": 10}
    {"history": [[...], [...]], "top_k": 10}                  one list per user

An entry is a product id (a view) or an object with `product_id` and optionally
`event_type` (view, cart, purchase, remove_from_cart; default view) and `event_time`
(REES46's "YYYY-MM-DD HH:MM:SS UTC", ISO 8601, or epoch seconds). A user's entries all
have a time or none has: with times the events are ordered by them, without they are in
list order and all at the time of the latest, one session. Anything else is a 400 that
names the entry and what was wrong.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np

from model.errors import BadRequest
from model.history import EVENT_TYPES, TYPE_CODES, RecentEvents

FIELDS = ("product_id", "event_type", "event_time")
_REES46_TIME = "%Y-%m-%d %H:%M:%S UTC"


def parse_histories(value: Any, product_rows: Any, keep: int | None) -> RecentEvents:
    """The `history` option as RecentEvents, one user per list (rows in request order);
    `product_rows(ids)` maps product ids to model rows (-1: unknown); the last `keep`
    events of each user are kept."""
    if not isinstance(value, list) or not value:
        raise BadRequest(
            '"history" must be a non-empty list of product ids or events (or one list per user)'
        )
    lists = value if all(isinstance(v, list) for v in value) else [value]
    users, ids, types, times = [], [], [], []
    for user, entries in enumerate(lists):
        where = f"history {user + 1}" if len(lists) > 1 else "history"
        if not entries:
            raise BadRequest(f"{where} is empty: give at least one event")
        parsed = [parse_event(entry, f"{where}, entry {n + 1}") for n, entry in enumerate(entries)]
        timed = [t is not None for _, _, t in parsed]
        if any(timed) and not all(timed):
            raise BadRequest(f"{where}: give event_time on every event or on none")
        order = sorted(range(len(parsed)), key=lambda n: parsed[n][2]) if all(timed) else None
        for n in order if order is not None else range(len(parsed)):
            product, kind, time = parsed[n]
            users.append(user)
            ids.append(product)
            types.append(kind)
            times.append(0 if time is None else time)
    return RecentEvents.build(
        np.array(users, np.int64),
        product_rows(np.array(ids, np.int64)),
        np.array(types, np.uint8),
        np.array(times, np.int64),
        len(lists),
        keep,
    )


def parse_event(entry: Any, where: str) -> tuple[int, int, int | None]:
    """(product id, event type code, epoch seconds or None) of one history entry (also an
    `events` entry's product, serve/events.py); `where` names it in the 400."""
    if is_id(entry):
        return entry, TYPE_CODES["view"], None
    if not isinstance(entry, dict):
        raise BadRequest(f"{where}: expected a product id or an object with product_id")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise BadRequest(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    product = entry.get("product_id")
    if not is_id(product):
        raise BadRequest(f"{where}: product_id must be an integer id, not {product!r}")
    kind = entry.get("event_type", "view")
    if not isinstance(kind, str) or kind not in TYPE_CODES:
        raise BadRequest(f"{where}: event_type {kind!r} unknown; use {', '.join(EVENT_TYPES)}")
    time = entry.get("event_time")
    return product, TYPE_CODES[kind], None if time is None else event_seconds(time, where)


def is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def event_seconds(value: Any, where: str) -> int:
    """Epoch seconds of an event_time: REES46's format, ISO 8601 (UTC if no zone), or a
    number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if np.isfinite(value) and abs(value) < 1e11:
            return int(value)
    elif isinstance(value, str):
        for parse in (
            lambda s: datetime.strptime(s, _REES46_TIME),
            lambda s: datetime.fromisoformat(s),
        ):
            try:
                stamp = parse(value.strip())
            except ValueError:
                continue
            return int((stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp())
    raise BadRequest(
        f"{where}: event_time {value!r} is not a time like 2019-11-02 10:00:00 UTC,"
        " ISO 8601 or epoch seconds"
    )
