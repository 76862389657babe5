"""The vectors file: a recommender's scoring state for the in-server MariaDB/MySQL function.

`write_vectors(recommender, path)` writes the post-tower user and item vectors, the
softmax log normalisers (when the model scores probabilities), the fallback scores
of the chosen policy, two id hash indexes and (history models) the repeat term's bonus
of each user's products into one flat, versioned, checksummed file, which
db/udf/recsql_udf.so memory-maps (format: db/udf/vectors.h). The file
is written next to its final name and renamed into place, so a server that has the
old file mapped keeps reading it until its statement ends.

`export_vectors(model_dir, path)` does the same for an artifact directory.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import load_model
from model.errors import DataError
from model.history import Bonus
from model.recommender import FALLBACKS, IdIndex, Recommender

MAGIC = b"RECSQLVF"
VERSION = 2  # 2: the bonus sections; the reader still reads version 1 files
HEADER_BYTES = 256
ALIGN = 64
FALLBACK_CODES = {"null": 0, "constant": 1, "per_item": 2}
_ENTRY = np.dtype([("id", "<i8"), ("row", "<i8")])
_BONUS_ENTRY = np.dtype([("row", "<i4"), ("value", "<f4")])
FLAG_PROBABILITIES, FLAG_BONUS = 1, 2
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class VectorsInfo:
    path: Path
    bytes: int
    users: int
    items: int
    dim: int
    probabilities: bool
    fallback: str
    crc32: int
    bonus_pairs: int = 0


def mix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, as vectors.c hashes an id (wrapping uint64 arithmetic)."""
    z = np.asarray(ids, np.int64).view(np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    return z


def hash_slots(index: IdIndex) -> tuple[np.ndarray, int]:
    """(slots {id, row}[2^k], max_probe): the index as an open-addressing table with
    linear probing (row -1: empty), at most half full; vectors.c reads it."""
    ids, rows = index.sorted_ids, index.sorted_rows
    n_slots = 1 << max(1, int(2 * len(ids) - 1).bit_length())
    mask = np.uint64(n_slots - 1)
    slots = np.zeros(n_slots, _ENTRY)
    slots["row"] = -1
    slot = (mix64(ids) & mask).astype(np.int64)
    pending = np.arange(len(ids))
    probe = 0
    # Round by round: of the ids whose current slot is empty, the first per slot takes
    # it; every id left moves one slot on. No id ever passes an empty slot, so a lookup
    # that meets one can stop.
    while len(pending):
        at = slot[pending]
        free = slots["row"][at] == -1
        taken, first = np.unique(at[free], return_index=True)
        winners = pending[free][first]
        slots["id"][taken], slots["row"][taken] = ids[winners], rows[winners]
        placed = np.zeros(len(ids), bool)
        placed[winners] = True
        pending = pending[~placed[pending]]
        if len(pending):
            probe += 1
            slot[pending] = (slot[pending] + 1) & (n_slots - 1)
    return slots, probe


def _fallback(rec: Recommender, policy: str) -> tuple[str, float, np.ndarray | None]:
    """The endpoint's fallback policy (Recommender.fallback_scores) as the file stores it."""
    if policy not in FALLBACKS:
        raise DataError(f"fallback {policy!r} unknown; use one of {', '.join(FALLBACKS)}")
    if policy == "null":
        return "null", float("nan"), None
    if policy == "mean" or rec.item_popularity is None:
        return "constant", float(rec.fallback_scores(np.zeros(1, np.int64), policy)[0]), None
    per_item = np.full(len(rec.item_vectors), np.nan, np.float32)
    named = rec.items.ids_by_row >= 0
    per_item[: len(named)][named] = rec.fallback_scores(rec.items.ids_by_row[named], policy)
    return "per_item", float(np.float32(rec.global_mean)), per_item


def _bonus_sections(bonus: Bonus, num_users: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets u64[users + 1], entries {row, value}[pairs]): the bonus as the file stores
    it, after checking what vectors.c relies on to find an entry with one binary search."""
    offsets = np.asarray(bonus.indptr)
    rows, values = np.asarray(bonus.items), np.asarray(bonus.values)
    if offsets.shape != (num_users + 1,) or rows.shape != values.shape or rows.ndim != 1:
        raise DataError(
            f"bonus must have {num_users + 1} offsets (one per user row, and the end) and as "
            f"many product rows as values; got {offsets.shape}, {rows.shape}, {values.shape}"
        )
    if offsets[0] != 0 or offsets[-1] != len(rows) or (np.diff(offsets) < 0).any():
        raise DataError("bonus offsets must rise from 0 to the number of entries")
    if len(rows) and (rows.min() < 0 or rows.max() >= num_items):
        raise DataError(f"bonus product rows must lie in 0..{num_items - 1}")
    ascending = np.diff(rows.astype(np.int64)) > 0
    starts = offsets[1:-1]
    ascending[starts[(starts > 0) & (starts < len(rows))] - 1] = True  # a new user's run
    if not ascending.all():
        raise DataError("bonus product rows must be sorted and distinct within each user")
    entries = np.empty(len(rows), _BONUS_ENTRY)
    entries["row"], entries["value"] = rows, values
    return offsets.astype("<u8"), entries


def write_vectors(rec: Recommender, path: str | Path, fallback: str = "null") -> VectorsInfo:
    """Write `rec` as a vectors file at `path` (atomically: a temporary file, then rename)."""
    users = np.ascontiguousarray(rec.user_vectors, "<f4")
    items = np.ascontiguousarray(rec.item_vectors, "<f4")
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise DataError("user and item vectors must be 2-D with the same width")
    lognorm = None
    if rec.probabilities:
        lognorm = np.ascontiguousarray(rec.user_log_normalizer, "<f4")
    kind, fallback_score, per_item = _fallback(rec, fallback)
    user_slots, user_probe = hash_slots(rec.users)
    item_slots, item_probe = hash_slots(rec.items)
    empty = np.empty(0, np.uint8)
    bonus = None
    if rec.bonus is not None:
        bonus = _bonus_sections(rec.bonus, len(users), len(items))
    sections = [
        users,
        items,
        lognorm if lognorm is not None else empty,
        per_item if per_item is not None else empty,
        user_slots,
        item_slots,
        *(bonus if bonus is not None else (empty, empty)),
    ]
    flags = FLAG_PROBABILITIES if lognorm is not None else 0
    pairs = 0
    if bonus is not None:
        flags |= FLAG_BONUS
        pairs = len(bonus[1])
    table, offset = [], HEADER_BYTES
    for array in sections:
        table.append((offset, array.nbytes))
        offset = -(-(offset + array.nbytes) // ALIGN) * ALIGN
    size = table[-1][0] + table[-1][1]
    head = struct.pack(
        "<QIIQQQQQQIfIIQ24x",
        size,
        users.shape[1],
        flags,
        len(users),
        len(items),
        len(rec.users),
        len(rec.items),
        len(user_slots),
        len(item_slots),
        FALLBACK_CODES[kind],
        fallback_score,
        user_probe,
        item_probe,
        pairs,
    )
    head += b"".join(struct.pack("<QQ", off, length) for off, length in table)
    head += bytes(HEADER_BYTES - 16 - len(head))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC + struct.pack("<II", VERSION, 0) + head)
            crc = zlib.crc32(head)
            position = HEADER_BYTES
            for (off, _), array in zip(table, sections, strict=True):
                pad = b"\0" * (off - position)
                data = array.reshape(-1).view(np.uint8)
                out.write(pad)
                out.write(data)
                crc = zlib.crc32(data, zlib.crc32(pad, crc))
                position = off + array.nbytes
            out.seek(12)
            out.write(struct.pack("<I", crc))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # the server reads it; group/others must not write it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return VectorsInfo(
        path,
        size,
        len(rec.users),
        len(rec.items),
        users.shape[1],
        lognorm is not None,
        fallback,
        crc,
        pairs,
    )


def export_vectors(model_dir: str | Path, path: str | Path, fallback: str = "null") -> VectorsInfo:
    """The vectors file of a recommender artifact (recsql-trained or seed MXNet)."""
    rec = load_model(model_dir)
    if not isinstance(rec, Recommender):
        kind = getattr(rec, "kind", type(rec).__name__)
        raise DataError(
            f"{model_dir}: a {kind} model has no vectors file; in-server scoring is for "
            "recommenders (use the HTTP endpoint for it)"
        )
    return write_vectors(rec, path, fallback)
