"""Production variants: which model answers a user, as a pure function of the user id.

A server with several variants (serve/, `recsql serve --variant`) sends each user to one
variant by weight, like SageMaker's InitialVariantWeight, but sticky: the choice is a
hash of the user id, so a user never flips between models mid-test, across workers,
restarts and machines. Anything that wants the same split (an SQL query routing by
hand, an A/B report) computes it from the same rule:

    fraction(user) = first 13 hex digits of MD5(the id's decimal text) / 2**52   in [0, 1)
    variant        = the first whose cumulative weight share exceeds the fraction

MD5 rather than a faster hash because every SQL engine recsql meets has it: MySQL,
MariaDB and Aurora compute the same fraction as
`CONV(LEFT(MD5(user_id), 13), 16, 10) / POW(2, 52)` (see README "Variants").
It is a spread, not a secret. Lives in model/ so that serve/ and db/ can both use it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np

from model import native
from model.errors import ArtifactError, RecsqlError

# SageMaker's rule for endpoint, variant and model names (db/ and deploy/ check it too;
# the Lambda handlers, zipped alone, keep a copy)
SAGEMAKER_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
DEFAULT_VARIANT = "AllTraffic"  # SageMaker's name for an endpoint's one variant
HASH_BITS = 52  # 13 hex digits: exact in a float64, and what SQL's CONV reads
_FEW = 64
_ONE_BY_ONE = 4  # up to this many ids, hashlib costs less than the call into C


def check_name(name: str) -> str:
    """`name` if it is a valid SageMaker variant name, else a one-line RecsqlError."""
    if not SAGEMAKER_NAME.match(name):
        raise RecsqlError(
            f"variant name {name!r} is not valid: 1-63 letters, digits and hyphens,"
            " starting and ending with a letter or digit"
        )
    return name


def text_fraction(text: bytes) -> float:
    """The routing fraction of one key (a user id's decimal text, an inference id, a body)."""
    digest = hashlib.md5(text, usedforsecurity=False).digest()
    return (int.from_bytes(digest[:7], "big") >> 4) / 2.0**HASH_BITS


def user_fractions(user_ids: np.ndarray) -> np.ndarray:
    """Each user id's routing fraction (float64 in [0, 1)); one MD5 per distinct id."""
    ids = np.asarray(user_ids, dtype=np.int64)
    if len(ids) <= _FEW:  # np.unique costs more than it saves
        return _fractions(ids)
    unique, inverse = np.unique(ids, return_inverse=True)
    return _fractions(unique)[inverse.reshape(-1)]


def _fractions(ids: np.ndarray) -> np.ndarray:
    if len(ids) > _ONE_BY_ONE:
        try:
            return native.variant_fractions(ids)  # the same MD5 in C, ~10x faster
        except ArtifactError:  # not built: tabular models say so; routing need not
            pass
    return np.fromiter((text_fraction(b"%d" % u) for u in ids.tolist()), np.float64, len(ids))


def shares(weights: Sequence[float]) -> np.ndarray:
    """Cumulative weight shares (last = 1): variant i takes fractions in [share[i-1], share[i])."""
    w = np.asarray(weights, dtype=np.float64)
    if not len(w) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise RecsqlError(f"variant weights must be >= 0 with a positive sum, not {list(weights)}")
    cumulative = np.cumsum(w) / w.sum()
    cumulative[-1] = 1.0
    return cumulative


class Router:
    """Variant weights -> the variant index of users (by id) or of a whole request (by key).
    A zero weight gets no traffic."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.cumulative = shares(weights)

    def assign(self, fractions: np.ndarray) -> np.ndarray:
        index = np.searchsorted(self.cumulative, fractions, side="right")
        return np.minimum(index, len(self.cumulative) - 1)

    def users(self, user_ids: np.ndarray) -> np.ndarray:
        return self.assign(user_fractions(user_ids))

    def key(self, text: bytes) -> int:
        """For a request without users: its inference id's, or its body's, variant."""
        return int(self.assign(np.array([text_fraction(text)]))[0])


def route_users(user_ids: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The variant index of each user under `weights`."""
    return Router(weights).users(user_ids)


def route_key(text: bytes, weights: Sequence[float]) -> int:
    """The variant index of a request without users, keyed by `text`."""
    return Router(weights).key(text)


def split_spec(text: str) -> tuple[str, str, str | None]:
    """`NAME=SOURCE[:WEIGHT]` (`recsql serve --variant`, `recsql deploy --variant`) ->
    (name, source, weight text or None). A last `:part` without a slash is the weight, so
    `s3://bucket/key` needs none. ValueError when the `=`, the name or what follows is
    missing; the callers say so in their own words."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(text)
    source, colon, tail = rest.rpartition(":")
    return (name, source, tail) if colon and "/" not in tail else (name, rest, None)


def parse_weight(text: str, what: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise RecsqlError(f"{what}: weight {text!r} must be a number >= 0")
    return weight
