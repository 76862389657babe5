"""Seeded synthetic REES46-shaped event files that behave like a shop.

Marginals follow the real Oct/Nov 2019 files (CONTRACTS.md section 8): 94.9% view, 3.6% cart,
1.5% purchase (after cart repeats); heavy-tailed (Zipf-like) user activity and product
popularity; empty category_code/brand on a share of products; cart rows sometimes repeated at
one timestamp; event_time non-decreasing through the output, over October and November 2019.

Planted structure (the knobs are SynthConfig's):

- Hidden groups: every user has a primary group and every product one group (`planted_groups`).
- Sessions: a user's activity comes in sessions, one `user_session` UUID each, events 1 to
  _MAX_GAP seconds apart on one day. A browse session has an interest group and a few candidate
  products (each from that group by popularity with probability `in_group`, else from all
  products by popularity). Each view repeats the previous product with probability
  `repeat_view`, else views a candidate at random; the session may end with a cart of the
  product viewed last (sometimes written several times at one timestamp) and a purchase of it.
- Consumables bought again: a `consumable_share` of products are consumables; each user has
  `staples` of them, drawn from their primary group by popularity. A `rebuy_share` of sessions
  views, carts and (mostly) buys one staple, so users buy the same product across sessions.
- Drifting interests: a browse session's interest is the user's primary group with probability
  `primary_share`, else a secondary group that changes every `drift_days` (per user, phase too).

The cart and purchase probabilities of a browse session are derived so that the type shares
come out right. `Oracle` answers, for a user, a history and a time, the generator's own
probability that the next event names each product: the ceiling a next-event model can reach.

Randomness comes only from numpy's PCG64 (and hashes of its draws), in chunks of a fixed number
of sessions, so one seed gives the same bytes whatever the number of files. A chunk's sessions
sit in its slice of time in draw order (time follows the global row number, as in the seed's
generator), the chunk is sorted by time, and no session spills past its slice, so time never
goes back. DuckDB only formats and writes the chunks (fast, in order). Plain CSV goes at ~1M
rows/s on 2 cores; .csv.gz is much slower (gzip runs on one core).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import numpy as np

from model.errors import DataError
from model.progress import progress_bar

log = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]

HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
)
EVENT_TYPES = ("view", "cart", "purchase")
TYPE_SHARES = (0.949, 0.036, 0.015)  # the real files' shares, after cart repeats
START_EPOCH = 1569888000  # 2019-10-01 00:00:00 UTC
SPAN_SECONDS = 61 * 86400  # October and November
_DAY = 86400
_SESSIONS = 1 << 16  # sessions (~340k rows) per chunk at most; smaller chunks write faster
_CART_REPEAT_P = 0.15  # share of cart events written several times at one timestamp
_CART_EXTRA_P = 0.35  # geometric parameter of the extra copies (mean 1/0.35)
_MAX_VIEWS = 40  # views of a browse session at most
_REBUY_VIEWS, _MAX_REBUY_VIEWS = 1.5, 5  # views of a re-buy session: mean before the cap, cap
_REBUY_BUY_P = 0.9  # a re-buy's cart is bought
_MAX_PRODUCTS = 8  # candidate products of a browse session at most
_GAP_MEAN, _MAX_GAP = 40, 300  # seconds between a session's events: geometric mean, cap
_MAX_SPAN = 3600  # a session's events lie within this many seconds of its first
_END_MARGIN = 3600  # the nominal time of the last row is this long before December
_EMPTY_CODE_P, _EMPTY_BRAND_P = 0.32, 0.14
_USER_LAW = (0.9, 10.0)  # (exponent, offset) of user activity (sessions) by rank
_PRODUCT_LAW = (1.1, 5.0)  # and of product popularity
# Salts of the per-purpose hashes (any distinct 64-bit constants).
_CANDIDATE, _STAPLE, _PHASE, _DRIFT = (
    np.uint64(0x9E3779B97F4A7C15 * k % (1 << 64)) for k in (1, 3, 5, 7)
)
_CATEGORY_CODES = (
    "electronics.smartphone", "electronics.audio.headphone", "electronics.video.tv",
    "electronics.clocks", "computers.notebook", "computers.desktop", "computers.peripherals.mouse",
    "appliances.kitchen.refrigerators", "appliances.kitchen.washer",
    "appliances.environment.vacuum",
    "apparel.shoes", "apparel.shoes.keds", "apparel.costume", "furniture.living_room.sofa",
    "furniture.bedroom.bed", "auto.accessories.player", "kids.toys", "sport.bicycle",
    "construction.tools.drill", "accessories.bag",
)  # fmt: skip
_BRANDS = (
    "samsung", "apple", "xiaomi", "huawei", "lucente", "sony", "lg", "bosch", "acer", "lenovo",
    "oppo", "respect", "cordiant", "philips", "indesit", "artel", "elenberg", "hp", "asus",
    "nike", "adidas", "redmond", "tefal", "vitek", "polaris", "janome", "canon", "jbl",
)  # fmt: skip


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Unset sizes scale with `rows` (see `resolved`).

    in_group: share of a browse session's candidate products drawn from its interest group
        (the rest by global popularity).
    primary_share: share of browse sessions whose interest is the user's primary group; the
        others follow the user's secondary group of the moment.
    drift_days: how long a secondary group lasts (each user switches at their own phase).
    session_views: mean views of a browse session (geometric, before the cap of 40).
    session_products: mean candidate products of a browse session (geometric, cap 8).
    repeat_view: probability that a view repeats the session's previous product.
    consumable_share: share of products that are consumables (at least one is).
    staples: consumables per user that the user re-buys.
    rebuy_share: share of sessions that re-buy a staple (views, a cart, 90% a purchase).
    """

    rows: int
    seed: int = 0
    users: int | None = None
    products: int | None = None
    groups: int | None = None
    in_group: float = 0.85
    primary_share: float = 0.7
    drift_days: float = 14.0
    session_views: float = 5.0
    session_products: float = 3.0
    repeat_view: float = 0.5
    consumable_share: float = 0.2
    staples: int = 3
    rebuy_share: float = 0.03

    def resolved(self) -> SynthConfig:
        """Fill in sizes: REES46 has ~3.5M users and ~165k products per ~55M-row month."""
        products = self.products or max(20, self.rows // 350)
        return replace(
            self,
            users=self.users or max(20, self.rows // 16),
            products=products,
            groups=self.groups or int(np.clip(products // 50, 2, 64)),
        )


@dataclass(frozen=True)
class _SessionLaw:
    """Session probabilities derived from a config so that the type shares match TYPE_SHARES."""

    view_p: float  # geometric parameter of a browse session's views
    rebuy_view_p: float  # and of a re-buy session's
    product_p: float  # and of a browse session's candidate products
    cart_p: float  # a browse session ends with a cart
    buy_p: float  # a browse session's cart is bought
    rows_per_session: float  # expected rows, cart repeats included


def _session_law(cfg: SynthConfig) -> _SessionLaw:
    probabilities = ("in_group", "primary_share", "repeat_view", "consumable_share", "rebuy_share")
    for name in probabilities:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise DataError(f"{name} must be within [0, 1], got {getattr(cfg, name)}")
    for name in ("session_views", "session_products"):
        if not getattr(cfg, name) >= 1.0:
            raise DataError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.staples < 1 or not cfg.drift_days > 0:
        raise DataError(
            f"staples and drift_days must be positive, got {cfg.staples}, {cfg.drift_days}"
        )
    view_p, rebuy_view_p = 1.0 / cfg.session_views, 1.0 / _REBUY_VIEWS
    r = cfg.rebuy_share
    views = (1 - r) * _capped_mean(view_p, _MAX_VIEWS) + r * _capped_mean(
        rebuy_view_p, _MAX_REBUY_VIEWS
    )
    share_view, share_cart, share_buy = _base_type_probs()
    carts, buys = views * share_cart / share_view, views * share_buy / share_view
    cart_p = (carts - r) / (1 - r) if r < 1 else 0.0
    buy_p = (buys - r * _REBUY_BUY_P) / ((1 - r) * cart_p) if cart_p > 0 else 0.0
    if not (0 <= cart_p <= 1 and 0 <= buy_p <= 1):
        raise DataError(
            f"rebuy_share {r} is too high for session_views {cfg.session_views}: "
            "the cart and purchase shares cannot be met"
        )
    repeat_factor = 1.0 + _CART_REPEAT_P / _CART_EXTRA_P
    return _SessionLaw(
        view_p,
        rebuy_view_p,
        1.0 / cfg.session_products,
        cart_p,
        buy_p,
        views + carts * repeat_factor + buys,
    )


def _capped_mean(p: float, cap: int) -> float:
    """E[min(G, cap)] for G geometric on 1, 2, ... with parameter p."""
    return (1.0 - (1.0 - p) ** cap) / p


class _GroupSampler:
    """Draws an item of group g by popularity with one searchsorted: the cdf of group g
    occupies [g, g + 1) of one sorted key array."""

    def __init__(self, items: np.ndarray, group: np.ndarray, weights: np.ndarray, n_groups: int):
        order = np.argsort(group, kind="stable")
        self.items, sorted_groups, weights = items[order], group[order], weights[order]
        group_sum = np.bincount(sorted_groups, weights, minlength=n_groups)
        group_start = np.cumsum(group_sum) - group_sum
        within = (np.cumsum(weights) - group_start[sorted_groups]) / group_sum[sorted_groups]
        ends = np.r_[sorted_groups[1:] != sorted_groups[:-1], True]
        within[ends] = 1.0  # exact group ends
        self.key = sorted_groups + within
        self.has_group = group_sum > 0
        self.cdf = np.cumsum(weights) / weights.sum()  # all items by popularity
        starts = np.r_[True, ends[:-1]]
        self._probs = (sorted_groups, within - np.where(starts, 0.0, np.r_[0.0, within[:-1]]))

    def draw(self, group: np.ndarray, u: np.ndarray) -> np.ndarray:
        """An item of each `group` (which must have items) for uniforms `u`."""
        at = np.searchsorted(self.key, group + u, side="right")
        return self.items[np.minimum(at, len(self.items) - 1)]

    def draw_any(self, u: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.cdf, u, side="right")
        return self.items[np.minimum(at, len(self.items) - 1)]

    def probabilities(self, n_groups: int, n_items: int) -> np.ndarray:
        """(groups, n_items): P(draw(g) = item); rows of empty groups are zero."""
        out = np.zeros((n_groups, n_items))
        out[self._probs[0], self.items] = self._probs[1]
        return out


class _World:
    """The fixed population: ids, groups, popularity, consumables and product attributes."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator) -> None:
        n_users, n_products, n_groups = cfg.users, cfg.products, cfg.groups
        assert n_users and n_products and n_groups
        self.n_users, self.n_products, self.n_groups = n_users, n_products, n_groups
        self.cfg = cfg
        # Activity/popularity rank -> external id, shuffled so rank does not follow id order.
        self.user_ids = _spread_ids(rng, n_users, base=512_000_000, stride=8)
        self.product_ids = _spread_ids(rng, n_products, base=1_000_000, stride=40)
        self.user_group = rng.integers(0, n_groups, n_users)
        self.product_group = product_group = rng.integers(0, n_groups, n_products)
        weights = _power_law_weights(n_products, *_PRODUCT_LAW)
        self.catalogue = _GroupSampler(np.arange(n_products), product_group, weights, n_groups)
        self.category_id = 2_053_013_552_226_107_603 + product_group * 1_000_003
        code = rng.integers(0, len(_CATEGORY_CODES), n_groups)[product_group]
        self.category_code = np.where(rng.random(n_products) < _EMPTY_CODE_P, -1, code)
        brand = rng.integers(0, len(_BRANDS), n_products)
        self.brand = np.where(rng.random(n_products) < _EMPTY_BRAND_P, -1, brand)
        self.price_cents = np.round(rng.lognormal(np.log(9000), 1.2, n_products)).astype(np.int64)
        self.price_cents = np.clip(self.price_cents, 50, 5_000_000)
        consumable = rng.random(n_products) < cfg.consumable_share
        consumable[0] |= not consumable.any()
        idx = np.flatnonzero(consumable)
        self.consumables = _GroupSampler(idx, product_group[idx], weights[idx], n_groups)
        self.salt = _mix64(np.array([cfg.seed], dtype=np.uint64))[0]

    def candidates(self, group: np.ndarray, h: np.ndarray) -> np.ndarray:
        """A browse session's candidate product, from its interest group and a 64-bit hash."""
        inside = (_unit(h) < self.cfg.in_group) & self.catalogue.has_group[group]
        u = _unit(_mix64(h))
        out = np.empty(len(h), dtype=np.int64)
        out[inside] = self.catalogue.draw(group[inside], u[inside])
        out[~inside] = _power_law_ranks(u[~inside], self.n_products, *_PRODUCT_LAW)
        return out

    def candidate_probabilities(self) -> np.ndarray:
        """(groups, products): P(a browse session of group g has product p as a candidate)."""
        anywhere = _power_law_probabilities(self.n_products, *_PRODUCT_LAW)
        inside = self.catalogue.probabilities(self.n_groups, self.n_products)
        share = np.where(self.catalogue.has_group, self.cfg.in_group, 0.0)[:, None]
        return share * inside + (1.0 - share) * anywhere

    def staple(self, user: np.ndarray, k: np.ndarray) -> np.ndarray:
        """User's k-th staple: a consumable of their primary group by popularity."""
        u = _unit(_hash(self.salt ^ _STAPLE, user, k))
        group = self.user_group[user]
        inside = self.consumables.has_group[group]
        return np.where(
            inside,
            self.consumables.draw(np.where(inside, group, 0), u),
            self.consumables.draw_any(u),
        )

    def secondary_group(self, user: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The user's secondary group at epoch second t: one per drift period, own phase."""
        period = max(1, int(self.cfg.drift_days * _DAY))
        phase = (_hash(self.salt ^ _PHASE, user) % np.uint64(period)).astype(np.int64)
        index = (np.asarray(t, np.int64) - START_EPOCH + phase) // period
        return (_hash(self.salt ^ _DRIFT, user, index) % np.uint64(self.n_groups)).astype(np.int64)


def planted_groups(cfg: SynthConfig) -> dict[str, np.ndarray]:
    """The hidden groups a seed plants: user_id -> primary group, product_id -> group arrays."""
    cfg = cfg.resolved()
    world = _World(cfg, np.random.default_rng(cfg.seed))
    return {
        "user_ids": world.user_ids,
        "user_group": world.user_group,
        "product_ids": world.product_ids,
        "product_group": world.product_group,
    }


def _power_law_weights(n: int, exponent: float, offset: float) -> np.ndarray:
    return 1.0 / (np.arange(n, dtype=np.float64) + offset) ** exponent


def _power_law_ranks(u: np.ndarray, n: int, exponent: float, offset: float) -> np.ndarray:
    """Ranks 0..n-1 with P(rank r) ~ (r + offset) ** -exponent (continuous inverse CDF).

    Closed form instead of searchsorted over a cdf: O(1) per draw at millions of users.
    """
    lo, hi = offset ** (1.0 - exponent), (n + offset) ** (1.0 - exponent)
    x = (lo + u * (hi - lo)) ** (1.0 / (1.0 - exponent)) - offset
    return np.minimum(x.astype(np.int64), n - 1)


def _power_law_probabilities(n: int, exponent: float, offset: float) -> np.ndarray:
    """P(_power_law_ranks(u) = r) for each rank r: differences of the same inverse CDF."""
    edges = (np.arange(n + 1, dtype=np.float64) + offset) ** (1.0 - exponent)
    return np.diff(edges) / (edges[-1] - edges[0])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash (wrapping uint64 arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(salt: np.uint64, *parts: np.ndarray) -> np.ndarray:
    h = np.asarray(parts[0]).astype(np.uint64) ^ salt
    for part in parts[1:]:
        h = _mix64(h) ^ np.asarray(part).astype(np.uint64)
    return _mix64(h)


def _unit(h: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) from the top 53 bits of a hash."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _spread_ids(rng: np.random.Generator, n: int, base: int, stride: int) -> np.ndarray:
    ids = base + np.arange(n, dtype=np.int64) * stride + rng.integers(0, stride, n)
    return rng.permutation(ids)


def _base_type_probs() -> np.ndarray:
    """Type probabilities before cart repeats, so the written shares match TYPE_SHARES."""
    repeat_factor = 1.0 + _CART_REPEAT_P / _CART_EXTRA_P
    probs = np.array(TYPE_SHARES) / np.array([1.0, repeat_factor, 1.0])
    return probs / probs.sum()


def _draw_sessions(world: _World, law: _SessionLaw, rng: np.random.Generator, n: int) -> Columns:
    """n sessions: who, what kind, how many views, candidates and cart rows, and their draws."""
    cfg = world.cfg
    user = _power_law_ranks(rng.random(n), world.n_users, *_USER_LAW)
    rebuy = rng.random(n) < cfg.rebuy_share
    browse_views = np.minimum(rng.geometric(law.view_p, n), _MAX_VIEWS)
    rebuy_views = np.minimum(rng.geometric(law.rebuy_view_p, n), _MAX_REBUY_VIEWS)
    products = np.minimum(rng.geometric(law.product_p, n), _MAX_PRODUCTS)
    cart = rebuy | (rng.random(n) < law.cart_p)
    bought = cart & (rng.random(n) < np.where(rebuy, _REBUY_BUY_P, law.buy_p))
    repeated = rng.random(n) < _CART_REPEAT_P
    copies = 1 + np.where(repeated, rng.geometric(_CART_EXTRA_P, n), 0)
    return {
        "user": user,
        "rebuy": rebuy,
        "views": np.where(rebuy, rebuy_views, browse_views),
        "products": np.where(rebuy, 1, products),
        "carts": np.where(cart, copies, 0),
        "bought": bought.astype(np.int64),
        "staple": rng.integers(0, cfg.staples, n),
        "primary": rng.random(n) < cfg.primary_share,
        "key": rng.integers(0, 1 << 64, n, dtype=np.uint64),
        "place": rng.random(n),
    }


def _chunk_columns(
    world: _World, law: _SessionLaw, rng: np.random.Generator, first_row: int, n_sessions: int
) -> Columns:
    """A chunk of sessions as rows sorted by time, in the columns the COPY statement formats."""
    s = _draw_sessions(world, law, rng, n_sessions)
    rows = s["views"] + s["carts"] + s["bought"]
    first = np.cumsum(rows) - rows
    n = int(rows.sum())
    session = np.repeat(np.arange(n_sessions), rows)
    position = np.arange(n) - first[session]
    views = s["views"][session]
    event_type = (position >= views).astype(np.int8) + (position >= views + s["carts"][session])
    # Seconds since the session's first row; repeated cart rows keep their first copy's second.
    gap = np.minimum(rng.geometric(1.0 / _GAP_MEAN, n), _MAX_GAP)
    gap[(position == 0) | ((event_type == 1) & (position > views))] = 0
    offset = np.cumsum(gap)
    offset = np.minimum(offset - offset[first][session], _MAX_SPAN)
    start, last_second = _session_starts(
        world.cfg.rows, first_row, first, rows, offset[first + rows - 1], s["place"]
    )
    t = np.minimum(start[session] + offset, last_second)
    product = _row_products(world, s, start, session, position, event_type, rng.random(n))
    order = np.argsort(t, kind="stable")  # sessions interleave; a session keeps its row order
    session, product = session[order], product[order]
    return {
        "t": t[order],
        "event_type": event_type[order],
        "product_id": world.product_ids[product],
        "category_id": world.category_id[product],
        "code": world.category_code[product].astype(np.int16),
        "brand": world.brand[product].astype(np.int16),
        "price_cents": world.price_cents[product],
        "user_id": world.user_ids[s["user"]][session],
        "session_hi": s["key"][session],
        "session_lo": _mix64(s["key"] ^ np.uint64(0x9E3779B97F4A7C15))[session],
    }


def _session_starts(
    total_rows: int,
    first_row: int,
    first: np.ndarray,
    rows: np.ndarray,
    span: np.ndarray,
    place: np.ndarray,
) -> tuple[np.ndarray, int]:
    """Each session's first second, and the last second of the chunk's slice of time.

    Time follows the global row number: the chunk's rows own a slice [lo, hi) of the two months
    (less _END_MARGIN), a session starts at its rows' place in the slice, squeezed so that it
    ends by hi. One that would run past midnight ends before it (or starts at it).
    """
    scale = (SPAN_SECONDS - _END_MARGIN) / total_rows
    n = int(rows.sum())
    lo = START_EPOCH + first_row * scale
    hi = START_EPOCH + (first_row + n) * scale
    first_second, last_second = int(np.floor(lo)), int(np.floor(hi))
    room = np.maximum(hi - lo - span, 0.0)
    start = np.floor(lo + (first + place * rows) / n * room).astype(np.int64)
    midnight = START_EPOCH + ((start - START_EPOCH) // _DAY + 1) * _DAY
    before = midnight - span - 1
    moved = np.where(before >= first_second, before, midnight)
    start = np.where(start + span >= midnight, moved, start)
    return np.clip(start, first_second, np.maximum(last_second - span, first_second)), last_second


def _row_products(
    world: _World,
    s: Columns,
    start: np.ndarray,
    session: np.ndarray,
    position: np.ndarray,
    event_type: np.ndarray,
    u: np.ndarray,
) -> np.ndarray:
    """Each row's product: a view repeats the previous one or jumps to a random candidate of its
    session (a re-buy's only candidate is the staple); carts and purchases name the last view."""
    stay = world.cfg.repeat_view
    first_view = position == 0
    jump = first_view | ((event_type == 0) & (u >= stay))
    at = np.flatnonzero(jump)
    u_at, later = u[at], ~first_view[at]
    u_at[later] = (u_at[later] - stay) / (1.0 - stay)  # uniform again, given u >= stay
    k = s["products"][session[at]]
    candidate = np.minimum((u_at * k).astype(np.int64), k - 1)
    user = s["user"]
    group = np.where(s["primary"], world.user_group[user], world.secondary_group(user, start))
    owner = session[at]
    product = world.candidates(
        group[owner], _hash(world.salt ^ _CANDIDATE, s["key"][owner], candidate)
    )
    rebuy = s["rebuy"][owner]
    product[rebuy] = world.staple(user[owner[rebuy]], s["staple"][owner[rebuy]])
    return product[np.cumsum(jump) - 1]


def _format_sql(out: Path, gzip: bool) -> str:
    types = "[" + ",".join(f"'{t}'" for t in EVENT_TYPES) + "]"
    codes = "[" + ",".join(f"'{c}'" for c in _CATEGORY_CODES) + "]"
    brands = "[" + ",".join(f"'{b}'" for b in _BRANDS) + "]"
    session = "((session_hi::UHUGEINT << 64) | session_lo::UHUGEINT)::UUID"
    compression = "gzip" if gzip else "none"
    # A single-table SELECT under COPY keeps the row order (DuckDB's order-preservation rules).
    return f"""
        COPY (SELECT strftime(make_timestamp(t * 1000000), '%Y-%m-%d %H:%M:%S UTC'),
                     {types}[event_type + 1], product_id, category_id,
                     CASE WHEN code >= 0 THEN {codes}[code + 1] END,
                     CASE WHEN brand >= 0 THEN {brands}[brand + 1] END,
                     (price_cents / 100)::DECIMAL(12, 2), user_id, {session}
              FROM chunk)
        TO '{out}' (FORMAT csv, HEADER false, COMPRESSION {compression})
    """


def _output_files(out: Path, files: int, gzip: bool) -> list[Path]:
    name = out.name.lower()
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        if files != 1:
            raise DataError(f"{out}: --files {files} needs a folder as --out, not a .csv file")
        return [out]
    suffix = ".csv.gz" if gzip else ".csv"
    return [out / f"events-{i:03d}{suffix}" for i in range(files)]


def write_synthetic(
    out: Path, cfg: SynthConfig, files: int = 1, gzip: bool = False, progress: bool = True
) -> dict:
    """Write `cfg.rows` events to `out` (a .csv/.csv.gz file, or a folder of `files` files)."""
    if cfg.rows < 1:
        raise DataError(f"--rows must be positive, got {cfg.rows}")
    if files < 1:
        raise DataError(f"--files must be positive, got {files}")
    cfg = cfg.resolved()
    law = _session_law(cfg)
    out = Path(out)
    paths = _output_files(out, files, gzip)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    world = _World(cfg, rng)
    started = time.perf_counter()
    bounds = np.linspace(0, cfg.rows, len(paths) + 1).astype(np.int64)
    con = duckdb.connect()
    bar = progress_bar(
        total=cfg.rows, unit="row", unit_scale=True, disable=not progress, desc="synth"
    )
    with tempfile.TemporaryDirectory(prefix="recsql-synth-") as tmp:
        gz = paths[0].name.lower().endswith(".gz")
        part = Path(tmp) / ("part.csv.gz" if gz else "part.csv")
        sql = _format_sql(part, gz)
        chunks = _sliced(_chunks(world, law, rng), bounds[1:])
        for path, end in zip(paths, bounds[1:], strict=True):
            # a reader that starts early never sees a half-written file: write, then rename
            partial = path.with_name(f".{path.name}.partial")
            with open(partial, "wb") as sink:
                _write_header(sink, path)
                for chunk, chunk_end in chunks:
                    con.register("chunk", chunk)
                    con.execute(sql)
                    con.unregister("chunk")
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, sink, 1 << 22)
                    bar.update(len(chunk["t"]))
                    if chunk_end == end:
                        break
            partial.replace(path)
    bar.close()
    seconds = time.perf_counter() - started
    stats = {
        "rows": cfg.rows,
        "files": [str(p) for p in paths],
        "users": cfg.users,
        "products": cfg.products,
        "groups": cfg.groups,
        "seed": cfg.seed,
        "seconds": round(seconds, 3),
        "rows_per_second": round(cfg.rows / max(seconds, 1e-9)),
    }
    log.debug("synth: %s", stats)
    return stats


def _chunks(world: _World, law: _SessionLaw, rng: np.random.Generator) -> Iterator[Columns]:
    """All chunks in order; the next one is drawn in a thread while the caller writes."""
    total = world.cfg.rows
    # Sessions per chunk: fixed for a config (the random stream depends on it), and no more
    # than a small set needs, so that 30k rows do not cost a million.
    n_sessions = min(_SESSIONS, int(1.05 * total / law.rows_per_session) + 64)
    with ThreadPoolExecutor(1) as pool:
        first_row = 0
        future = pool.submit(_chunk_columns, world, law, rng, first_row, n_sessions)
        while True:
            chunk = future.result()
            first_row += len(chunk["t"])
            if first_row < total:  # one stream of draws, in order: same seed, same bytes
                future = pool.submit(_chunk_columns, world, law, rng, first_row, n_sessions)
            yield chunk
            if first_row >= total:
                return


def _sliced(chunks: Iterator[Columns], ends: np.ndarray) -> Iterator[tuple[Columns, int]]:
    """Cut the chunk stream at the file boundaries `ends`: (piece, global row after it)."""
    row = 0
    for end in ends.tolist():
        while row < end:
            chunk = next(chunks)
            take = min(end - row, len(chunk["t"]))
            yield {k: v[:take] for k, v in chunk.items()}, row + take
            row += take
            if take < len(chunk["t"]):
                chunks = itertools.chain([{k: v[take:] for k, v in chunk.items()}], chunks)


def _write_header(sink, path: Path) -> None:
    data = (HEADER + "\n").encode()
    if path.name.lower().endswith(".gz"):
        import gzip as gz

        data = gz.compress(data, mtime=0)  # concatenated gzip members form one valid stream
    sink.write(data)


class Oracle:
    """The generator's own probability that a user's next event names each product.

    `scores` returns, per user, P(next event's product = p) over `product_ids` (the order of
    `planted_groups(cfg)["product_ids"]`), given the user's history and the next event's time.
    It knows what the generator knows: primary group, secondary group at any time, staples,
    popularity and the session law (a session in progress, its views, their repeats, its kind).
    Exact under the generator except that (1) the session in progress is read off the history
    as its last run of views at most _MAX_GAP seconds apart on one day (a second session of the
    same user starting within _MAX_GAP seconds is ignored), (2) a session's candidates are taken
    to be distinct products, and (3) gaps flattened by the _MAX_SPAN clip are ignored.

        oracle = Oracle(SynthConfig(rows=200_000, seed=1))
        probs = oracle.scores(user_ids, at_times, rows, product_ids, times, types)
        top10 = oracle.product_ids[np.argsort(-probs, axis=1)[:, :10]]
    """

    def __init__(self, cfg: SynthConfig) -> None:
        cfg = cfg.resolved()
        self._law = law = _session_law(cfg)
        self._world = world = _World(cfg, np.random.default_rng(cfg.seed))
        self.product_ids: np.ndarray = world.product_ids
        self._user_index = np.argsort(world.user_ids)
        self._product_index = np.argsort(world.product_ids)
        self._candidates = world.candidate_probabilities().astype(np.float32)
        with np.errstate(divide="ignore"):
            self._log_candidates = np.log(world.candidate_probabilities())
            size = np.arange(1, _MAX_PRODUCTS + 1)  # a browse session's number of candidates K
            prior = law.product_p * (1.0 - law.product_p) ** (size - 1.0)
            prior[-1] = (1.0 - law.product_p) ** (_MAX_PRODUCTS - 1)
            self._log_size_prior = np.log(prior)
            # [K - 1, d - 1]: log of prod_{m < d} (K - m) / K, the K-part of meeting d distinct
            # candidates (-inf where d > K).
            ratio = np.clip((size[:, None] - size[None, :]) / size[:, None], 0.0, None)
            self._log_new = np.c_[np.zeros(_MAX_PRODUCTS), np.cumsum(np.log(ratio), axis=1)[:, :-1]]

    def columns(self, product_ids: np.ndarray) -> np.ndarray:
        """The score columns of external product ids."""
        return _lookup(self.product_ids, self._product_index, product_ids, "product_id")

    def scores(
        self,
        user_ids: np.ndarray,
        at_times: np.ndarray,
        history_rows: np.ndarray,
        history_products: np.ndarray,
        history_times: np.ndarray,
        history_types: np.ndarray,
    ) -> np.ndarray:
        """(users, products) float32 probabilities, rows summing to 1.

        user_ids, at_times: the users (external ids) and the epoch second of the event to
        predict. history_*: the users' earlier events, flat: the row in user_ids each belongs
        to, external product id, epoch second, type ("view"/"cart"/"purchase" or 0/1/2); one
        user's events oldest first (users may interleave).
        """
        world = self._world
        user = _lookup(world.user_ids, self._user_index, user_ids, "user_id")
        at = np.asarray(at_times, dtype=np.int64)
        n = len(user)
        order = np.argsort(np.asarray(history_rows, dtype=np.int64), kind="stable")
        # one dummy event at the end stands for "no history" (type 3 is no session)
        row = np.r_[np.asarray(history_rows, dtype=np.int64)[order], -1]
        products = np.asarray(history_products, dtype=np.int64)[order]
        product = np.r_[_lookup(world.product_ids, self._product_index, products, "product_id"), 0]
        t = np.r_[np.asarray(history_times, dtype=np.int64)[order], 0]
        kind = np.r_[_type_codes(np.asarray(history_types)[order]), 3]
        day = (t - START_EPOCH) // _DAY
        joined = np.r_[
            False,
            (row[1:] == row[:-1])
            & (np.diff(t) <= _MAX_GAP)
            & (day[1:] == day[:-1])
            & (kind[1:] == 0)
            & (kind[:-1] == 0),
        ]
        run_start = np.flatnonzero(~joined)[np.cumsum(~joined) - 1]
        real = len(row) - 1
        last = np.searchsorted(row[:real], np.arange(n), side="right") - 1
        last = np.where((last >= 0) & (row[np.maximum(last, 0)] == np.arange(n)), last, real)
        live = (at - t[last] <= _MAX_GAP) & ((at - START_EPOCH) // _DAY == day[last])
        carted = live & (kind[last] == 1)
        viewing = live & (kind[last] == 0)

        primary = world.user_group[user]
        group_b = world.secondary_group(user, at)
        coef_a = np.full(n, (1.0 - world.cfg.rebuy_share) * world.cfg.primary_share)
        coef_b = np.full(n, (1.0 - world.cfg.rebuy_share) * (1.0 - world.cfg.primary_share))
        staples = world.staple(user[:, None], np.arange(world.cfg.staples)[None, :])
        sparse_rows = [np.repeat(np.arange(n), world.cfg.staples), np.arange(n)]
        sparse_cols = [staples.ravel(), product[last]]
        new_session = np.repeat(world.cfg.rebuy_share / world.cfg.staples, staples.size)
        sparse_vals = [new_session, np.zeros(n)]

        if viewing.any():
            session = np.zeros(len(row), dtype=bool)  # the history's events in that session
            session[:real] = viewing[row[:real]] & (run_start[:real] == run_start[last][row[:real]])
            v = self._in_session(
                user, row, product, t, joined, session, last, run_start, staples, viewing
            )
            on = v["on"]  # in a session of views whose law fits: scored as its continuation
            coef_a[on], coef_b[on] = v["primary"][on], v["secondary"][on]
            group_b[on] = v["group"][on]
            sparse_vals[0] = np.where(np.repeat(on, world.cfg.staples), 0.0, new_session)
            sparse_vals[1] = np.where(on, v["last"], 0.0)
            sparse_rows.append(v["pair_row"])
            sparse_cols.append(v["pair_product"])
            sparse_vals.append(np.where(on[v["pair_row"]], v["seen"][v["pair_row"]], 0.0))
        coef_a[carted] = coef_b[carted] = 0.0  # a cart row is followed by its own product
        sparse_vals[0] = np.where(np.repeat(carted, world.cfg.staples), 0.0, sparse_vals[0])
        sparse_vals[1] = np.where(carted, 1.0, sparse_vals[1])

        out = self._candidates[primary] * coef_a[:, None].astype(np.float32)
        out += self._candidates[group_b] * coef_b[:, None].astype(np.float32)
        np.add.at(
            out,
            (np.concatenate(sparse_rows), np.concatenate(sparse_cols)),
            np.concatenate(sparse_vals).astype(np.float32),
        )
        return out

    def _in_session(
        self,
        user: np.ndarray,
        row: np.ndarray,
        product: np.ndarray,
        t: np.ndarray,
        joined: np.ndarray,
        session: np.ndarray,
        last: np.ndarray,
        run_start: np.ndarray,
        staples: np.ndarray,
        viewing: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """The next product of users amid a run of views, as coefficients of the two group
        distributions plus point masses: Bayes over the session's kind (browse or re-buy), its
        group (primary or secondary) and its number of candidates, given the views so far."""
        world, law, cfg = self._world, self._law, self._world.cfg
        n, stay, r, share = len(user), cfg.repeat_view, cfg.rebuy_share, cfg.primary_share
        views = np.bincount(row[session], minlength=n)
        previous = np.r_[-1, product[:-1]]
        n_same = np.bincount(row[session & joined & (product == previous)], minlength=n)
        pairs = np.unique(row[session] * world.n_products + product[session])
        pair_row, pair_product = pairs // world.n_products, pairs % world.n_products
        distinct = np.bincount(pair_row, minlength=n)
        n_other = views - 1 - n_same - np.maximum(distinct - 1, 0)
        group = world.secondary_group(user, t[run_start[last]])
        logq = self._log_candidates
        with np.errstate(divide="ignore", invalid="ignore"):
            lq_a = np.bincount(pair_row, logq[world.user_group[user][pair_row], pair_product], n)
            lq_b = np.bincount(pair_row, logq[group[pair_row], pair_product], n)
            lq_a, lq_b = np.log(share) + lq_a, np.log1p(-share) + lq_b
            log_group = np.logaddexp(lq_a, lq_b)
            size = np.arange(1, _MAX_PRODUCTS + 1)
            d = np.clip(distinct, 1, _MAX_PRODUCTS)
            ll = (
                _xlogy(n_same[:, None], stay + (1.0 - stay) / size)
                + _xlogy(n_other[:, None], (1.0 - stay) / size)
                + _xlogy(np.maximum(distinct - 1, 0)[:, None], np.full(1, 1.0 - stay))
                + self._log_new[:, d - 1].T
                + self._log_size_prior
            )
            ll[distinct > _MAX_PRODUCTS] = -np.inf
            log_size = np.logaddexp.reduce(ll, axis=1)
            w = np.exp(ll - log_size[:, None])
            w[~np.isfinite(log_size)] = 0.0
            mean_inv = w @ (1.0 / size)  # E[1/K], and E[(K - d)/K] below
            mean_unseen = (w * (size - d[:, None]) / size).sum(axis=1)
            hazard = np.where(views < _MAX_VIEWS, law.view_p, 1.0)
            go_on = (1.0 - hazard) + hazard * law.cart_p  # P(the browse session goes on)
            log_browse = (
                np.log1p(-r)
                + log_size
                + log_group
                + np.log(go_on)
                + _xlogy(views - 1, np.full(1, 1.0 - law.view_p))
            )
            log_browse[views > _MAX_VIEWS] = -np.inf
            matches = (staples == product[last][:, None]).sum(axis=1)
            log_rebuy = (
                np.log(r)
                + np.log(matches / cfg.staples)
                + _xlogy(views - 1, np.full(1, 1.0 - law.rebuy_view_p))
            )
            log_rebuy[(distinct != 1) | (views > _MAX_REBUY_VIEWS)] = -np.inf
            log_total = np.logaddexp(log_browse, log_rebuy)
            on = viewing & np.isfinite(log_total)
            browse = np.where(on, np.exp(log_browse - log_total), 0.0)
            rebuy = np.where(on, np.exp(log_rebuy - log_total), 0.0)
            to_view = np.where(go_on > 0, browse * (1.0 - hazard) / go_on, 0.0)
            to_cart = np.where(go_on > 0, browse * hazard * law.cart_p / go_on, 0.0)
            unseen = to_view * (1.0 - stay) * mean_unseen
            to_a = np.where(on & np.isfinite(log_group), np.exp(lq_a - log_group), 0.0)
        return {
            "on": on,
            "group": group,
            "primary": unseen * to_a,
            "secondary": unseen * (1.0 - to_a),
            "last": rebuy + to_cart + to_view * stay,
            "seen": to_view * (1.0 - stay) * mean_inv,
            "pair_row": pair_row,
            "pair_product": pair_product,
        }


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x * log(y), 0 where x == 0 (even where y == 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x == 0, 0.0, x * np.log(y))


def _lookup(ids: np.ndarray, index: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Internal rows of external ids (`index` sorts `ids`)."""
    wanted = np.asarray(wanted, dtype=np.int64)
    sorted_ids = ids[index]
    at = np.minimum(np.searchsorted(sorted_ids, wanted), len(ids) - 1)
    unknown = sorted_ids[at] != wanted
    if unknown.any():
        raise DataError(f"{what} {wanted[unknown][0]} is not in this config's synthetic set")
    return index[at]


def _type_codes(types: np.ndarray) -> np.ndarray:
    """Event type codes: 0 view, 1 cart, 2 purchase, 3 anything else."""
    if types.dtype.kind in "iu":
        return types.astype(np.int64)
    codes = np.full(len(types), len(EVENT_TYPES), dtype=np.int64)
    for code, name in enumerate(EVENT_TYPES):
        codes[types == name] = code
    return codes


def run_synth_command(args: argparse.Namespace) -> int:
    cfg = SynthConfig(
        rows=args.rows,
        seed=args.seed,
        users=getattr(args, "users", None),
        products=getattr(args, "products", None),
        groups=getattr(args, "groups", None),
    )
    stats = write_synthetic(
        args.out,
        cfg,
        files=getattr(args, "files", 1),
        gzip=getattr(args, "gzip", False),
        progress=not getattr(args, "no_progress", False),
    )
    print(
        f"wrote {stats['rows']:,} rows to {len(stats['files'])} file(s) under {args.out} in "
        f"{stats['seconds']:.1f} s ({stats['rows_per_second']:,} rows/s); users {stats['users']:,},"
        f" products {stats['products']:,}, hidden groups {stats['groups']}, seed {stats['seed']}"
    )
    return 0
