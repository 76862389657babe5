"""Seeded synthetic REES46-shaped event files, with structure a recommender can learn.

Marginals follow the real Oct/Nov 2019 files (CONTRACTS.md section 8): 94.9% view, 3.6% cart,
1.5% purchase; heavy-tailed (Zipf-like) user activity and product popularity; empty
category_code/brand on a share of products; cart rows sometimes repeated at one timestamp;
event_time increasing through the output.

Planted structure: every user and product belongs to one of `groups` hidden groups. A user's
event picks a product of the user's own group with probability `in_group_view` (views) or
`in_group_buy` (carts, purchases), following the product popularity inside that group, and
otherwise any product by global popularity. A model that learns the groups beats a popularity
ranking on HR@10.

Randomness comes only from numpy's PCG64 in fixed-size chunks, so one seed gives the same bytes
whatever the number of files; DuckDB only formats and writes the chunks (fast, in order).
Plain CSV goes at ~1M+ rows/s on 2 cores; .csv.gz is much slower (gzip runs on one core).
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
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
from tqdm import tqdm

from model.errors import DataError

log = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]

HEADER = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
)
EVENT_TYPES = ("view", "cart", "purchase")
TYPE_SHARES = (0.949, 0.036, 0.015)  # the real files' shares, after cart repeats
START_EPOCH = 1569888000  # 2019-10-01 00:00:00 UTC
SPAN_SECONDS = 61 * 86400  # October and November
_CHUNK = 1 << 20  # base events per chunk; fixed, because the random stream depends on it
_CART_REPEAT_P = 0.15  # share of cart events written several times at one timestamp
_CART_EXTRA_P = 0.35  # geometric parameter of the extra copies (mean 1/0.35)
_EMPTY_CODE_P, _EMPTY_BRAND_P = 0.32, 0.14
_USER_LAW = (0.9, 10.0)  # (exponent, offset) of user activity by rank
_PRODUCT_LAW = (1.1, 5.0)  # and of product popularity
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
    """What to generate. Unset sizes scale with `rows` (see `resolved`)."""

    rows: int
    seed: int = 0
    users: int | None = None
    products: int | None = None
    groups: int | None = None
    in_group_view: float = 0.75
    in_group_buy: float = 0.9

    def resolved(self) -> SynthConfig:
        """Fill in sizes: REES46 has ~3.5M users and ~165k products per ~55M-row month."""
        products = self.products or max(20, self.rows // 350)
        return SynthConfig(
            rows=self.rows,
            seed=self.seed,
            users=self.users or max(20, self.rows // 16),
            products=products,
            groups=self.groups or int(np.clip(products // 50, 2, 64)),
            in_group_view=self.in_group_view,
            in_group_buy=self.in_group_buy,
        )


class _World:
    """The fixed population: ids, groups, popularity and product attributes."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator) -> None:
        n_users, n_products, n_groups = cfg.users, cfg.products, cfg.groups
        assert n_users and n_products and n_groups
        self.n_users, self.n_products = n_users, n_products
        # Activity/popularity rank -> external id, shuffled so rank does not follow id order.
        self.user_ids = _spread_ids(rng, n_users, base=512_000_000, stride=8)
        self.product_ids = _spread_ids(rng, n_products, base=1_000_000, stride=40)
        self.user_group = rng.integers(0, n_groups, n_users)
        self.product_group = product_group = rng.integers(0, n_groups, n_products)
        # One searchsorted samples "a product of group g by popularity": the cdf of each group
        # occupies [g, g + 1) of one sorted key array.
        self.by_group = np.argsort(product_group, kind="stable")
        sorted_groups = product_group[self.by_group]
        weights = _power_law_weights(n_products, *_PRODUCT_LAW)[self.by_group]
        group_sum = np.bincount(sorted_groups, weights, minlength=n_groups)
        group_start = np.cumsum(group_sum) - group_sum
        within = (np.cumsum(weights) - group_start[sorted_groups]) / group_sum[sorted_groups]
        within[np.r_[sorted_groups[1:] != sorted_groups[:-1], True]] = 1.0  # exact group ends
        self.group_key = sorted_groups + within
        self.has_group = group_sum > 0
        self.category_id = 2_053_013_552_226_107_603 + product_group * 1_000_003
        code = rng.integers(0, len(_CATEGORY_CODES), n_groups)[product_group]
        self.category_code = np.where(rng.random(n_products) < _EMPTY_CODE_P, -1, code)
        brand = rng.integers(0, len(_BRANDS), n_products)
        self.brand = np.where(rng.random(n_products) < _EMPTY_BRAND_P, -1, brand)
        self.price_cents = np.round(rng.lognormal(np.log(9000), 1.2, n_products)).astype(np.int64)
        self.price_cents = np.clip(self.price_cents, 50, 5_000_000)


def planted_groups(cfg: SynthConfig) -> dict[str, np.ndarray]:
    """The hidden groups a seed plants: user_id -> group and product_id -> group arrays."""
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


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash (wrapping uint64 arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _spread_ids(rng: np.random.Generator, n: int, base: int, stride: int) -> np.ndarray:
    ids = base + np.arange(n, dtype=np.int64) * stride + rng.integers(0, stride, n)
    return rng.permutation(ids)


def _base_type_probs() -> np.ndarray:
    """Type probabilities before cart repeats, so the written shares match TYPE_SHARES."""
    repeat_factor = 1.0 + _CART_REPEAT_P / _CART_EXTRA_P
    probs = np.array(TYPE_SHARES) / np.array([1.0, repeat_factor, 1.0])
    return probs / probs.sum()


def _draw_chunk(world: _World, cfg: SynthConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One chunk of base events, cart repeats expanded; columns as small numpy arrays."""
    m = _CHUNK
    event_type = np.searchsorted(np.cumsum(_base_type_probs())[:-1], rng.random(m), side="right")
    user = _power_law_ranks(rng.random(m), world.n_users, *_USER_LAW)
    group = world.user_group[user]
    p_in = np.where(event_type == 0, cfg.in_group_view, cfg.in_group_buy)
    in_group = (rng.random(m) < p_in) & world.has_group[group]
    key = group + rng.random(m)
    grouped = world.by_group[np.minimum(np.searchsorted(world.group_key, key, side="right"),
                                        len(world.by_group) - 1)]  # fmt: skip
    anywhere = _power_law_ranks(rng.random(m), world.n_products, *_PRODUCT_LAW)
    product = np.where(in_group, grouped, anywhere)
    repeated = (event_type == 1) & (rng.random(m) < _CART_REPEAT_P)
    copies = np.ones(m, dtype=np.int64)
    copies[repeated] += rng.geometric(_CART_EXTRA_P, int(repeated.sum()))
    return {
        "event_type": np.repeat(event_type, copies),
        "user": np.repeat(user, copies),
        "product": np.repeat(product, copies),
        "copies": copies,
    }


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
    out = Path(out)
    paths = _output_files(out, files, gzip)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    world = _World(cfg, rng)
    started = time.perf_counter()
    bounds = np.linspace(0, cfg.rows, len(paths) + 1).astype(np.int64)
    con = duckdb.connect()
    bar = tqdm(total=cfg.rows, unit="row", unit_scale=True, disable=not progress, desc="synth")
    with tempfile.TemporaryDirectory(prefix="recsql-synth-") as tmp:
        gz = paths[0].name.lower().endswith(".gz")
        part = Path(tmp) / ("part.csv.gz" if gz else "part.csv")
        sql = _format_sql(part, gz)
        chunks = _sliced(_chunks(world, cfg, rng), bounds[1:])
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


def _chunks(world: _World, cfg: SynthConfig, rng: np.random.Generator) -> Iterator[Columns]:
    """All chunks in order; the next one is drawn in a thread while the caller writes."""
    with ThreadPoolExecutor(1) as pool:
        first_row = 0
        future = pool.submit(_chunk_columns, world, cfg, rng, first_row)
        while True:
            chunk = future.result()
            first_row += len(chunk["t"])
            if first_row < cfg.rows:  # one stream of draws, in order: same seed, same bytes
                future = pool.submit(_chunk_columns, world, cfg, rng, first_row)
            yield chunk
            if first_row >= cfg.rows:
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


def _chunk_columns(
    world: _World, cfg: SynthConfig, rng: np.random.Generator, first_row: int
) -> Columns:
    """Chunk rows as the columns the COPY statement formats; times follow the global row."""
    drawn = _draw_chunk(world, cfg, rng)
    copies = drawn.pop("copies")
    first_copy = first_row + np.repeat(np.cumsum(copies) - copies, copies)
    # Time grows with the row number; repeated cart rows keep their first copy's second.
    t = START_EPOCH + (first_copy.astype(np.float64) * SPAN_SECONDS / cfg.rows).astype(np.int64)
    product, user = drawn["product"], drawn["user"]
    return {
        "t": t,
        "event_type": drawn["event_type"].astype(np.int8),
        "product_id": world.product_ids[product],
        "category_id": world.category_id[product],
        "code": world.category_code[product].astype(np.int16),
        "brand": world.brand[product].astype(np.int16),
        "price_cents": world.price_cents[product],
        "user_id": world.user_ids[user],
        **_session_ids(user, t, cfg.seed),
    }


def _session_ids(user: np.ndarray, t: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """One session per user and day, as the two halves of a UUID."""
    day = ((t - START_EPOCH) // 86400).astype(np.uint64)
    key = (user.astype(np.uint64) << np.uint64(8)) | day
    hi = _mix64(key ^ _mix64(np.full(1, seed, dtype=np.uint64)))
    return {"session_hi": hi, "session_lo": _mix64(hi ^ np.uint64(0x9E3779B97F4A7C15))}


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
