"""The artifact's files, as every model kind writes them: the manifest and the id indexes.

    recsql.json         {"format": "recsql", "format_version", "kind", ...}
    user_index.csv      user_id,user      (external id -> embedding row)
    product_index.csv   product_id,item

model/artifact.py (MFBlock, `load_model`), model/tabular.py and model/mxnet.py read
and write through these; this module imports nothing else of recsql but its errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from model.errors import ArtifactError

FORMAT_VERSION = 2  # 2: history models (user_tower, repeat, events.*)
MANIFEST = "recsql.json"
WEIGHTS = "weights.safetensors"
USER_INDEX = "user_index.csv"
PRODUCT_INDEX = "product_index.csv"


def write_manifest(model_dir: Path, kind: str, **fields: Any) -> None:
    """The manifest, with the oldest format_version that reads it (1 unless a history model),
    so that an older recsql still serves what it can."""
    history = (fields.get("user_tower") or {}).get("kind") == "history"
    version = FORMAT_VERSION if history else 1
    manifest = {"format": "recsql", "format_version": version, "kind": kind, **fields}
    (Path(model_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_jsonable))


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot read the model manifest ({exc})") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != "recsql"
        or not isinstance(manifest.get("kind"), str)
    ):
        raise ArtifactError(f"{path}: not a recsql manifest")
    version = manifest.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest['format_version']} is newer than this recsql reads"
            f" ({FORMAT_VERSION})"
        )
    return manifest


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in the manifest")


def write_index(path: Path, id_column: str, row_column: str, ids: np.ndarray) -> None:
    """Write `id,row` lines, row = position in `ids`."""
    ids = np.asarray(ids, dtype=np.int64)
    rows = np.arange(len(ids))
    body = "\n".join(f"{i},{r}" for i, r in zip(ids.tolist(), rows.tolist(), strict=True))
    Path(path).write_text(
        f"{id_column},{row_column}\n{body}\n" if len(ids) else f"{id_column},{row_column}\n"
    )


def read_index(path: Path, id_column: str, row_column: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an `id,row` CSV (any column order, extra columns ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: index file missing")
    try:
        con = duckdb.connect()
        rel = con.read_csv(str(path), header=True, all_varchar=True)
        if id_column not in rel.columns or row_column not in rel.columns:
            raise ArtifactError(
                f"{path}: expected columns {id_column},{row_column}; found {','.join(rel.columns)}"
            )
        bad = con.sql(
            f"""SELECT count(*) FROM rel
            WHERE NOT regexp_full_match(coalesce(trim("{id_column}"), ''), '-?[0-9]+')
               OR NOT regexp_full_match(coalesce(trim("{row_column}"), ''), '[0-9]+')"""
        ).fetchall()[0][0]
        if bad:
            raise ArtifactError(
                f"{path}: {bad} line(s) where {id_column} or {row_column} is not an integer"
            )
        cols = con.sql(
            f'SELECT CAST("{id_column}" AS BIGINT) AS i, '
            f'CAST("{row_column}" AS BIGINT) AS r FROM rel'
        ).fetchnumpy()
    except duckdb.Error as exc:
        raise ArtifactError(f"{path}: cannot read the index ({exc})") from exc
    return np.asarray(cols["i"], np.int64), np.asarray(cols["r"], np.int64)
