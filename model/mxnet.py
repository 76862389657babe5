"""Read the seed's MXNet Gluon MFBlock artifact without MXNet.

The seed (the AWS workshop's Gluon recommender, SageMaker script mode) leaves:

    model.params         the network's weights, MXNet's NDArray list format
    MFBlock.params       JSON {"max_users": N, "max_items": M, "num_emb": 64, "dropout_p": 0.5}
    user_index.csv       user_id,user        (older variants: customer_index.csv customer_id,user)
    product_index.csv    product_id,item

`load_seed_artifact(dir)` turns it into a `Recommender`; `read_ndarray_file` is
the format reader on its own.

The NDArray list format
-----------------------
Written by `mx.nd.save` (C API `MXNDArraySave`) through
`NDArray::Save(dmlc::Stream*, const std::vector<NDArray>&, const std::vector<std::string>&)`
in MXNet's src/ndarray/ndarray.cc; the containers are dmlc-core's
include/dmlc/serializer.h. Checked against apache/mxnet master (b84609d, 2023) and
dmlc-core (5295de9), and against files written by mxnet 1.9.1 (`save_params`,
`save_parameters`, `export`, float16, NumPy-shape V3: all load and score as
MXNet does). Integers are little-endian (dmlc streams and x86 hosts):

    uint64 kMXAPINDArrayListMagic = 0x112, uint64 reserved (0)
    uint64 count, then `count` NDArrays
    uint64 name count (0 or `count`), then each name as uint64 length + bytes

One NDArray (`NDArray::Save` / `NDArray::Load` / `NDArray::LegacyLoad`):

    uint32 magic: 0xF993FAC9 (V2, with storage type), 0xF993FACA (V3, NumPy
        shape semantics), 0xF993FAC8 (V1, no storage type), or, in files older
        than V1, no magic at all: this word is already the shape's ndim
    int32 storage type (V2/V3 only): 0 dense; 1 row-sparse and 2 CSR carry an
        extra storage shape and aux arrays, refused here
    shape (mxnet::Tuple::Save): int32 ndim, then ndim int64 dims; pre-V1 files
        use uint32 dims. ndim 0 (V3: ndim -1 or a dim of -1) is a "none" array
        and nothing follows it
    context: int32 dev_type (1 cpu, 2 gpu, 3 cpu_pinned, 5 cpu_shared), int32 dev_id
    int32 type flag (mshadow/base.h TypeFlag): 0 float32, 1 float64, 2 float16,
        3 uint8, 4 int32, 5 int8, 6 int64, 7 bool, 8 int16, 9 uint16,
        10 uint32, 11 uint64, 12 bfloat16
    the data, C order, prod(shape) * itemsize bytes

Parameter names
---------------
Gluon writes one of two naming schemes, both mapped onto MFBlock's names:

- `save_parameters` (MXNet >= 1.2.1, and `save_params` in 1.2.0 only): the
  attribute path, `user_embeddings.weight` ... `dense_item.bias`, the names
  MFBlock uses.
- `save_params` (every other version, 0.11-1.9: the block's own prefix is
  stripped, `embedding0_weight`), `export` and symbol checkpoints
  (`arg:mfblock0_embedding0_weight`), plain `mx.nd.save` of
  `collect_params()` (`mfblock0_embedding0_weight`): generated names
  `[arg:|aux:][prefix]embedding<k>_weight`, `dense<k>_weight`, `dense<k>_bias`.
  Gluon numbers blocks of one kind in creation order, and the
  seed's `MFBlock.__init__` creates the user block of each pair before the item
  block, so the lower-numbered embedding is the user table and the
  lower-numbered Dense the user tower. Numbers are compared as integers (so
  `dense10` follows `dense9`), whatever the order of the names in the file.
Shapes then have to agree with MFBlock.params: Embedding weights are
(input_dim, output_dim), Dense weights (units, in_units) like torch's Linear.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from model.errors import ArtifactError
from model.format import read_index
from model.recommender import Recommender

log = logging.getLogger(__name__)

PARAMS_FILE = "model.params"
BLOCK_FILE = "MFBlock.params"
# (file, id column, row column), first existing file wins
USER_INDEXES = (
    ("user_index.csv", "user_id", "user"),
    ("customer_index.csv", "customer_id", "user"),
)
PRODUCT_INDEXES = (("product_index.csv", "product_id", "item"),)

MFBLOCK_PARAMS = (
    "user_embeddings.weight",
    "item_embeddings.weight",
    "dense_user.weight",
    "dense_user.bias",
    "dense_item.weight",
    "dense_item.bias",
)

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_VERSIONS = {V1_MAGIC: "V1", V2_MAGIC: "V2", V3_MAGIC: "V3"}
# Pre-V1 files start with ndim; anything larger is not a shape but a bad magic.
_MAX_LEGACY_NDIM = 32
_DEV_TYPES = {1, 2, 3, 5}
# type flag -> (name, numpy dtype); bfloat16 is read as uint16 and widened.
_DTYPES = {
    0: ("float32", "<f4"),
    1: ("float64", "<f8"),
    2: ("float16", "<f2"),
    3: ("uint8", "u1"),
    4: ("int32", "<i4"),
    5: ("int8", "i1"),
    6: ("int64", "<i8"),
    7: ("bool", "u1"),
    8: ("int16", "<i2"),
    9: ("uint16", "<u2"),
    10: ("uint32", "<u4"),
    11: ("uint64", "<u8"),
    12: ("bfloat16", "<u2"),
}
_BFLOAT16 = 12

_GENERATED_NAME = re.compile(
    r"(?P<prefix>.*?)(?P<kind>embedding|dense)(?P<num>\d+)_(?P<param>weight|bias)"
)


class _Reader:
    """Sequential reads from a file that turn a short read into an ArtifactError."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ArtifactError(f"{self.path}: file ends inside {what} (truncated?)")
        return struct.unpack(fmt, data)

    def raw(self, nbytes: int, what: str) -> np.ndarray:
        buf = np.empty(nbytes, dtype=np.uint8)
        if nbytes and self.f.readinto(buf) != nbytes:  # type: ignore[attr-defined]
            raise ArtifactError(f"{self.path}: file ends inside {what} (truncated?)")
        return buf

    def remaining(self) -> int:
        here = self.f.tell()
        end = self.f.seek(0, 2)
        self.f.seek(here)
        return end - here


def read_ndarray_file(path: str | Path) -> tuple[dict[str, np.ndarray | None], str]:
    """Read an `mx.nd.save` file: {name: array or None (a "none" NDArray)}, format version.

    Only dense arrays are accepted; bfloat16 comes back as float32, other dtypes
    as they are. Anything malformed raises ArtifactError.
    """
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot open ({exc.strerror})") from exc
    with f:
        r = _Reader(f, path)
        magic, _reserved = r.unpack("<QQ", "the file header")
        if magic != LIST_MAGIC:
            raise ArtifactError(
                f"{path}: not an MXNet NDArray file (magic {magic:#x}, expected {LIST_MAGIC:#x})"
            )
        (count,) = r.unpack("<Q", "the array count")
        if count * 4 > r.remaining():  # even a "none" array takes 4 bytes
            raise ArtifactError(f"{path}: array count {count} does not fit in the file")
        arrays, versions = [], set()
        for i in range(count):
            array, version = _read_ndarray(r, f"array {i}")
            arrays.append(array)
            versions.add(version)
        names = _read_names(r, count)
        if f.read(1):
            raise ArtifactError(f"{path}: unexpected bytes after the last name")
    if len(set(names)) != len(names):
        raise ArtifactError(f"{path}: parameter names repeat")
    return dict(zip(names, arrays, strict=True)), "+".join(sorted(versions)) or "empty"


def _read_names(r: _Reader, count: int) -> list[str]:
    (n_names,) = r.unpack("<Q", "the name count")
    if n_names != count:
        detail = "no names (saved as a list)" if n_names == 0 else f"{n_names} names"
        raise ArtifactError(f"{r.path}: {count} arrays but {detail}; expected one name per array")
    names = []
    for i in range(n_names):
        (length,) = r.unpack("<Q", f"name {i}")
        if length > r.remaining():
            raise ArtifactError(f"{r.path}: name {i} is longer than the rest of the file")
        try:
            names.append(r.raw(length, f"name {i}").tobytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{r.path}: name {i} is not UTF-8 text") from exc
    return names


def _read_ndarray(r: _Reader, what: str) -> tuple[np.ndarray | None, str]:
    (magic,) = r.unpack("<I", f"{what}'s magic")
    version = _VERSIONS.get(magic, "pre-V1")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("<i", f"{what}'s storage type")
        if stype != 0:
            kind = {1: "row-sparse", 2: "CSR"}.get(stype, f"unknown ({stype})")
            raise ArtifactError(f"{r.path}: {what} has {kind} storage; only dense arrays are read")
    if magic in _VERSIONS:
        (ndim,) = r.unpack("<i", f"{what}'s shape")
        if ndim < -1 or ndim > _MAX_LEGACY_NDIM or (ndim == -1 and magic != V3_MAGIC):
            raise ArtifactError(f"{r.path}: {what} has an impossible ndim {ndim}")
        shape = r.unpack(f"<{max(ndim, 0)}q", f"{what}'s shape")
    elif magic <= _MAX_LEGACY_NDIM:
        ndim = magic
        shape = r.unpack(f"<{ndim}I", f"{what}'s shape")
    else:
        raise ArtifactError(f"{r.path}: {what} has an unknown NDArray magic {magic:#x}")
    if magic == V3_MAGIC and (ndim == -1 or any(d == -1 for d in shape)):
        return None, version  # unknown shape: a "none" array, nothing follows
    if magic != V3_MAGIC and ndim == 0:
        return None, version
    if any(d < 0 for d in shape):
        raise ArtifactError(f"{r.path}: {what} has a negative dimension in shape {shape}")
    dev_type, _dev_id = r.unpack("<ii", f"{what}'s context")
    if dev_type not in _DEV_TYPES:
        raise ArtifactError(f"{r.path}: {what} has an unknown device type {dev_type}")
    (flag,) = r.unpack("<i", f"{what}'s type flag")
    if flag not in _DTYPES:
        raise ArtifactError(f"{r.path}: {what} has an unknown type flag {flag}")
    dtype = np.dtype(_DTYPES[flag][1])
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > r.remaining():
        raise ArtifactError(
            f"{r.path}: {what} needs {nbytes} bytes of data, more than the file holds (truncated?)"
        )
    data = r.raw(nbytes, f"{what}'s data").view(dtype).reshape(shape)
    if flag == _BFLOAT16:  # bfloat16 is the top half of a float32
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data, version


def mfblock_weights(
    params: dict[str, np.ndarray | None], source: str = "model.params"
) -> dict[str, np.ndarray]:
    """Map Gluon parameter names (either scheme, see the module docstring) to MFBlock's."""
    stripped: dict[str, np.ndarray | None] = {}
    for name, value in params.items():
        key = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
        if key in stripped:
            raise ArtifactError(f"{source}: parameter {key!r} appears twice")
        stripped[key] = value
    if any("." in key for key in stripped):
        mapping = {key: key for key in stripped}
    else:
        mapping = _map_generated_names(list(stripped), source)
    missing = sorted(set(MFBLOCK_PARAMS) - set(mapping.values()))
    unexpected = sorted(k for k, v in mapping.items() if v not in MFBLOCK_PARAMS)
    if missing:
        raise ArtifactError(f"{source}: missing MFBlock parameter(s) {', '.join(missing)}")
    if unexpected:
        raise ArtifactError(f"{source}: unexpected parameter(s) {', '.join(unexpected)}")
    weights = {}
    for key, target in mapping.items():
        weights[target] = _as_float32(stripped[key], key, source)
    return weights


def _map_generated_names(names: list[str], source: str) -> dict[str, str]:
    """`mfblock0_embedding0_weight`-style names -> MFBlock names, by block number."""
    parsed, prefixes = {}, set()
    for name in names:
        m = _GENERATED_NAME.fullmatch(name)
        if m is None:
            raise ArtifactError(
                f"{source}: unexpected parameter {name!r}; expected MFBlock's"
                " embedding<k>_weight / dense<k>_weight / dense<k>_bias"
            )
        prefixes.add(m["prefix"])
        parsed[name] = (m["kind"], int(m["num"]), m["param"])
    if len(prefixes) > 1:
        raise ArtifactError(f"{source}: parameters come from several blocks ({sorted(prefixes)})")
    mapping = {}
    for kind, towers in (
        ("embedding", ("user_embeddings", "item_embeddings")),
        ("dense", ("dense_user", "dense_item")),
    ):
        numbers = sorted({num for k, num, _ in parsed.values() if k == kind})
        if len(numbers) != 2:
            raise ArtifactError(
                f"{source}: expected 2 {kind} layers (user, item), found {len(numbers)}"
            )
        tower_of = dict(zip(numbers, towers, strict=True))
        for name, (k, num, param) in parsed.items():
            if k == kind:
                mapping[name] = f"{tower_of[num]}.{param}"
    return mapping


def _as_float32(value: np.ndarray | None, name: str, source: str) -> np.ndarray:
    if value is None:
        raise ArtifactError(f"{source}: parameter {name!r} is empty (never initialised?)")
    if value.dtype.kind != "f":
        raise ArtifactError(
            f"{source}: parameter {name!r} has dtype {value.dtype};"
            " expected float16, float32, float64 or bfloat16"
        )
    out = value.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise ArtifactError(
            f"{source}: parameter {name!r} holds NaN or infinity (training diverged?)"
        )
    return out


def read_block_params(path: Path) -> dict[str, Any]:
    """MFBlock.params: the constructor arguments, checked."""
    try:
        block = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot read the MFBlock settings ({exc})") from exc
    if not isinstance(block, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    for key in ("max_users", "max_items", "num_emb"):
        value = block.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ArtifactError(f"{path}: {key} must be a positive integer, got {value!r}")
    dropout = block.get("dropout_p", 0.5)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ArtifactError(f"{path}: dropout_p must be a number in [0, 1), got {dropout!r}")
    return block


def _check_shapes(weights: dict[str, np.ndarray], block: dict[str, Any], source: str) -> None:
    e = block["num_emb"]
    expected = {
        "user_embeddings.weight": (block["max_users"], e),
        "item_embeddings.weight": (block["max_items"], e),
        "dense_user.weight": (e, e),
        "dense_user.bias": (e,),
        "dense_item.weight": (e, e),
        "dense_item.bias": (e,),
    }
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise ArtifactError(
                f"{source}: {name} has shape {weights[name].shape}; MFBlock.params implies {shape}"
            )


def _read_seed_index(
    model_dir: Path, choices: tuple[tuple[str, str, str], ...], table_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    for file, id_col, row_col in choices:
        if (model_dir / file).is_file():
            ids, rows = read_index(model_dir / file, id_col, row_col)
            break
    else:
        names = " or ".join(file for file, _, _ in choices)
        raise ArtifactError(f"{model_dir}: index file missing ({names})")
    path = model_dir / file
    if len(rows) and (rows.min() < 0 or rows.max() >= table_rows):
        raise ArtifactError(f"{path}: row numbers outside the {table_rows}-row embedding table")
    if len(np.unique(ids)) != len(ids):
        raise ArtifactError(f"{path}: ids repeat")
    if len(np.unique(rows)) != len(rows):
        raise ArtifactError(f"{path}: two ids share one embedding row")
    return ids, rows


def load_seed_artifact(model_dir: str | Path) -> Recommender:
    """Load a seed MXNet MFBlock directory as a Recommender (no MXNet needed)."""
    model_dir = Path(model_dir)
    block = read_block_params(model_dir / BLOCK_FILE)
    params_path = model_dir / PARAMS_FILE
    if not params_path.is_file():
        raise ArtifactError(f"{model_dir}: {PARAMS_FILE} missing beside {BLOCK_FILE}")
    params, version = read_ndarray_file(params_path)
    weights = mfblock_weights(params, str(params_path))
    _check_shapes(weights, block, str(params_path))
    user_ids, user_rows = _read_seed_index(model_dir, USER_INDEXES, block["max_users"])
    item_ids, item_rows = _read_seed_index(model_dir, PRODUCT_INDEXES, block["max_items"])
    log.info(
        "loaded seed MXNet MFBlock from %s: %d users, %d items, num_emb %d (NDArray %s)",
        model_dir,
        len(user_ids),
        len(item_ids),
        block["num_emb"],
        version,
    )
    return Recommender.from_weights(
        weights,
        user_ids,
        item_ids,
        user_rows,
        item_rows,
        info={
            "source": "mxnet-seed",
            "ndarray_format": version,
            "num_emb": block["num_emb"],
            "dropout_p": float(block.get("dropout_p", 0.5)),
        },
    )
