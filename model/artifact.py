"""The recsql artifact: a model directory, tarred as `model.tar.gz` for SageMaker.

    model_dir/
      recsql.json            format, kind, architecture, training config and metrics
      weights.safetensors    tensors (no code runs on load)
      user_index.csv         user_id,user      (external id -> embedding row)
      product_index.csv      product_id,item
      metrics.json, curves.png   written by training, not needed to serve

A history model (manifest `user_tower.kind` "history", format_version 2) has no user
embeddings: its weights hold each user's last `recent_events` events (`events.indptr`,
`events.items`, `events.types`, `events.times`; user_index rows index `events.indptr`),
the tower's position and event-type weights, and `repeat` in the manifest.

`load_model(dir)` reads any servable model directory: a recsql MFBlock, a
recsql tabular model, or a seed MXNet MFBlock directory (read without MXNet).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from model.errors import ArtifactError
from model.format import (
    MANIFEST,
    PRODUCT_INDEX,
    USER_INDEX,
    WEIGHTS,
    read_index,
    read_manifest,
    write_index,
    write_manifest,
)
from model.history import EVENT_TYPES, RepeatTerm
from model.recommender import Recommender


def save_mfblock(
    model_dir: Path,
    weights: dict[str, np.ndarray],
    user_ids: np.ndarray,
    product_ids: np.ndarray,
    **manifest_fields: Any,
) -> Path:
    """Write an MFBlock artifact. `weights` uses MFBlock's parameter names."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {  # the events keep their integer types; every parameter is float32
        k: np.ascontiguousarray(v, dtype=v.dtype if k.startswith("events.") else np.float32)
        for k, v in weights.items()
    }
    save_file(tensors, str(model_dir / WEIGHTS))
    # safetensors writes 0600: a model trained as root must load in a non-root server image
    (model_dir / WEIGHTS).chmod(0o644)
    write_index(model_dir / USER_INDEX, "user_id", "user", user_ids)
    write_index(model_dir / PRODUCT_INDEX, "product_id", "item", product_ids)
    write_manifest(model_dir, "mfblock", **manifest_fields)
    return model_dir


def _load_mfblock(model_dir: Path, manifest: dict[str, Any]) -> Recommender:
    path = model_dir / WEIGHTS
    try:
        with open(path, "rb"):  # the real errno (EACCES, ENOENT) before safetensors hides it
            pass
        weights = load_file(str(path))
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read weights ({exc.strerror})") from exc
    except Exception as exc:  # safetensors raises its own error type
        raise ArtifactError(f"{path}: cannot read weights ({exc})") from exc
    history = manifest.get("user_tower", {"kind": "embedding"})
    if not isinstance(history, dict) or history.get("kind") not in ("embedding", "history"):
        raise ArtifactError(f"{model_dir / MANIFEST}: user_tower.kind must be embedding or history")
    history = history["kind"] == "history"
    _check_mfblock_shapes(weights, model_dir / WEIGHTS, history)
    user_ids, user_rows = read_index(model_dir / USER_INDEX, "user_id", "user")
    item_ids, item_rows = read_index(model_dir / PRODUCT_INDEX, "product_id", "item")
    num_users = (
        len(weights["events.indptr"]) - 1 if history else len(weights["user_embeddings.weight"])
    )
    _check_rows(user_rows, num_users, model_dir / USER_INDEX)
    _check_rows(item_rows, weights["item_embeddings.weight"].shape[0], model_dir / PRODUCT_INDEX)
    score = manifest.get("score") or {"kind": "raw"}
    temperature = None
    if isinstance(score, dict) and score.get("kind") == "probability":
        temperature = score.get("temperature")
        normalizer = weights.get("user_log_normalizer")
        if (
            not isinstance(temperature, int | float)
            or isinstance(temperature, bool)
            or not temperature > 0
        ):
            raise ArtifactError(f"{model_dir / MANIFEST}: score.temperature must be a number > 0")
        if normalizer is None or normalizer.shape != (num_users,):
            raise ArtifactError(
                f"{model_dir / WEIGHTS}: a probability-scored model needs user_log_normalizer,"
                " one value per user row"
            )
    try:
        repeat = RepeatTerm.from_json(manifest.get("repeat")) if history else None
        return Recommender.from_weights(
            weights,
            user_ids,
            item_ids,
            user_rows,
            item_rows,
            temperature=temperature,
            repeat=repeat,
            global_mean=float(manifest.get("global_mean", 0.0)),
            item_popularity=weights.get("item_popularity"),
            info={**manifest, "source": "recsql"},
        )
    except ValueError as exc:  # IdIndex: duplicate ids; the repeat term's fields
        raise ArtifactError(f"{model_dir}: {exc}") from exc


_EVENTS = {
    "events.indptr": np.int64,
    "events.items": np.int32,
    "events.types": np.uint8,
    "events.times": np.int64,
}


def _check_mfblock_shapes(weights: dict[str, np.ndarray], path: Path, history: bool) -> None:
    """Every MFBlock tensor present, with shapes that fit together; a history model's events
    well-formed (sorted offsets, known product rows and types)."""
    bias = weights.get("dense_user.bias")
    e = bias.shape[0] if bias is not None and bias.ndim == 1 else -1
    expected: dict[str, tuple] = {
        "item_embeddings.weight": (None, e),
        "dense_user.weight": (e, e),
        "dense_user.bias": (e,),
        "dense_item.weight": (e, e),
        "dense_item.bias": (e,),
    }
    if history:
        expected.update({"history_position": (None,), "history_type": (len(EVENT_TYPES),)})
        expected.update({name: (None,) for name in _EVENTS})
    else:
        expected["user_embeddings.weight"] = (None, e)
    missing = [name for name in expected if name not in weights]
    if missing:
        raise ArtifactError(f"{path}: missing tensor(s) {', '.join(missing)}")
    for name, shape in expected.items():
        got = weights[name].shape
        if len(got) != len(shape) or any(
            s is not None and g != s for g, s in zip(got, shape, strict=True)
        ):
            raise ArtifactError(f"{path}: {name} has shape {got}; expected {shape}")
    if history:
        _check_events(weights, path)


def _check_events(weights: dict[str, np.ndarray], path: Path) -> None:
    for name, dtype in _EVENTS.items():
        if weights[name].dtype != dtype:
            raise ArtifactError(f"{path}: {name} must be {np.dtype(dtype)}")
    indptr, n = weights["events.indptr"], len(weights["events.items"])
    if len(weights["events.types"]) != n or len(weights["events.times"]) != n:
        raise ArtifactError(f"{path}: the events tensors differ in length")
    if not len(indptr) or indptr[0] != 0 or indptr[-1] != n or np.any(np.diff(indptr) < 0):
        raise ArtifactError(f"{path}: events.indptr is not a CSR offset array over the events")
    items = weights["events.items"]
    if n and (items.min() < -1 or items.max() >= len(weights["item_embeddings.weight"])):
        raise ArtifactError(f"{path}: events.items name product rows the model does not have")
    if n and weights["events.types"].max() >= len(EVENT_TYPES):
        raise ArtifactError(f"{path}: events.types holds an unknown event type code")
    if len(weights["history_position"]) == 0:
        raise ArtifactError(f"{path}: history_position is empty")


def _check_rows(rows: np.ndarray, n: int, path: Path) -> None:
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ArtifactError(f"{path}: row numbers outside the {n}-row embedding table")


def load_model(model_dir: str | Path) -> Any:
    """Load any servable model directory into its in-memory model."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: model directory not found")
    if (model_dir / MANIFEST).is_file():
        manifest = read_manifest(model_dir)
        if manifest["kind"] == "mfblock":
            return _load_mfblock(model_dir, manifest)
        if manifest["kind"] == "tabular":  # imported on use: XGBoost, LightGBM, the C kernels
            from model.tabular import load_tabular

            return load_tabular(model_dir, manifest)
        raise ArtifactError(f"{model_dir}: unknown model kind {manifest['kind']!r}")
    if (model_dir / "MFBlock.params").is_file():
        from model.mxnet import load_seed_artifact

        return load_seed_artifact(model_dir)
    raise ArtifactError(
        f"{model_dir}: no {MANIFEST} (recsql artifact) and no MFBlock.params (seed artifact)"
    )


def pack(model_dir: Path, tar_path: Path) -> Path:
    """Tar a model directory's contents (not the directory itself) as model.tar.gz."""
    model_dir, tar_path = Path(model_dir), Path(tar_path)
    with tarfile.open(tar_path, "w:gz") as tar:
        for child in sorted(model_dir.iterdir()):
            tar.add(child, arcname=child.name)
    return tar_path


def safe_extract(tar_path: Path, dest: Path) -> Path:
    """Extract model.tar.gz, refusing absolute paths, `..`, links and devices."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                name = member.name
                if name.startswith("/") or Path(name).is_absolute():
                    raise ArtifactError(f"{tar_path}: refusing absolute path {name!r}")
                if ".." in Path(name).parts:
                    raise ArtifactError(f"{tar_path}: refusing path with '..': {name!r}")
                if not (member.isfile() or member.isdir()):
                    raise ArtifactError(f"{tar_path}: refusing link or special file {name!r}")
                if not (root / name).resolve().is_relative_to(root):
                    raise ArtifactError(f"{tar_path}: refusing path outside the target: {name!r}")
            tar.extractall(dest, members=members, filter="data")
    except tarfile.TarError as exc:
        raise ArtifactError(f"{tar_path}: not a readable tar archive ({exc})") from exc
    return dest
