"""The recsql artifact: save/load round trip, model.tar.gz packing and safe extraction."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from model import load_model, pack, safe_extract, save_mfblock
from model.errors import ArtifactError
from model.format import MANIFEST, read_index, read_manifest, write_manifest

NUM_EMB = 4


def make_weights(num_users: int, num_items: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "user_embeddings.weight": rng.normal(size=(num_users, NUM_EMB)).astype(np.float32),
        "item_embeddings.weight": rng.normal(size=(num_items, NUM_EMB)).astype(np.float32),
        "dense_user.weight": rng.normal(size=(NUM_EMB, NUM_EMB)).astype(np.float32),
        "dense_user.bias": np.full(NUM_EMB, 0.3, np.float32),
        "dense_item.weight": rng.normal(size=(NUM_EMB, NUM_EMB)).astype(np.float32),
        "dense_item.bias": np.full(NUM_EMB, 0.3, np.float32),
    }


def towers(weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    users = np.maximum(
        w["user_embeddings.weight"] @ w["dense_user.weight"].T + w["dense_user.bias"], 0
    )
    items = np.maximum(
        w["item_embeddings.weight"] @ w["dense_item.weight"].T + w["dense_item.bias"], 0
    )
    return users, items


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    user_ids = np.array([5_000_000_001, 12, 7, 300])
    product_ids = np.array([44, 1, 2**40, 9, 10, 11])
    weights = make_weights(len(user_ids), len(product_ids))
    model_dir = save_mfblock(
        tmp_path / "model", weights, user_ids, product_ids, global_mean=0.25, objective="rating"
    )
    return model_dir, weights, user_ids, product_ids


def test_save_and_load_round_trip(saved) -> None:
    model_dir, weights, user_ids, product_ids = saved
    model = load_model(model_dir)
    users, items = towers(weights)
    u = np.repeat(np.arange(len(user_ids)), len(product_ids))
    i = np.tile(np.arange(len(product_ids)), len(user_ids))
    expected = np.sum(users[u] * items[i], axis=1)
    np.testing.assert_allclose(model.score(user_ids[u], product_ids[i]), expected, rtol=1e-5)
    assert np.isnan(model.score(np.array([999]), np.array([44])))[0]
    assert model.global_mean == 0.25
    assert model.describe()["objective"] == "rating"
    assert model.describe()["source"] == "recsql"
    manifest = read_manifest(model_dir)
    assert (manifest["format"], manifest["kind"], manifest["format_version"]) == (
        "recsql",
        "mfblock",
        1,
    )


def test_index_files_are_plain_csv(saved) -> None:
    model_dir, _, user_ids, _ = saved
    lines = (model_dir / "user_index.csv").read_text().splitlines()
    assert lines[0] == "user_id,user"
    assert lines[1:] == [f"{i},{r}" for r, i in enumerate(user_ids)]
    ids, rows = read_index(model_dir / "user_index.csv", "user_id", "user")
    np.testing.assert_array_equal(ids, user_ids)
    np.testing.assert_array_equal(rows, np.arange(len(user_ids)))


def test_pack_and_safe_extract_round_trip(saved, tmp_path: Path) -> None:
    model_dir, weights, user_ids, product_ids = saved
    tar_path = pack(model_dir, tmp_path / "model.tar.gz")
    with tarfile.open(tar_path) as tar:
        names = sorted(tar.getnames())
    # SageMaker extracts into /opt/ml/model: files must sit at the archive root
    assert names == sorted(p.name for p in model_dir.iterdir())
    dest = safe_extract(tar_path, tmp_path / "extracted")
    for name in names:
        assert (dest / name).read_bytes() == (model_dir / name).read_bytes()
    a, b = load_model(model_dir), load_model(dest)
    np.testing.assert_array_equal(
        a.score(user_ids, product_ids[:4]), b.score(user_ids, product_ids[:4])
    )


def _tar_with(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("recsql.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "member, data, message",
    [
        (_info("../escape.txt"), b"x", "'..'"),
        (_info("sub/../../escape.txt"), b"x", "'..'"),
        (_info("/tmp/recsql-abs-escape.txt"), b"x", "absolute path"),
        (_info("link", tarfile.SYMTYPE, "/etc/passwd"), None, "link or special file"),
        (_info("rel-link", tarfile.SYMTYPE, "recsql.json"), None, "link or special file"),
        (_info("hard", tarfile.LNKTYPE, "recsql.json"), None, "link or special file"),
        (_info("dev", tarfile.CHRTYPE), None, "link or special file"),
        (_info("blk", tarfile.BLKTYPE), None, "link or special file"),
        (_info("fifo", tarfile.FIFOTYPE), None, "link or special file"),
    ],
)
def test_safe_extract_refuses(tmp_path: Path, member, data, message: str) -> None:
    tar_path = _tar_with(tmp_path, (member, data))
    dest = tmp_path / "out" / "model"
    with pytest.raises(ArtifactError, match=message):
        safe_extract(tar_path, dest)
    # refused before anything was written, inside or outside the target
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "out" / "escape.txt").exists()
    assert not Path("/tmp/recsql-abs-escape.txt").exists()


def test_safe_extract_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "model.tar.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ArtifactError, match="not a readable tar archive"):
        safe_extract(path, tmp_path / "out")


def test_read_manifest_refuses_newer_format(saved) -> None:
    model_dir = saved[0]
    manifest = json.loads((model_dir / MANIFEST).read_text())
    (model_dir / MANIFEST).write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(ArtifactError, match="format_version 3 is newer"):
        read_manifest(model_dir)
    with pytest.raises(ArtifactError, match="format_version 3 is newer"):
        load_model(model_dir)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "\x00\x01garbage",
        json.dumps({"format": "other", "kind": "mfblock"}),
        json.dumps({"format": "recsql", "kind": 3}),
        json.dumps({"format": "recsql"}),
    ],
)
def test_read_manifest_refuses_garbage(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(ArtifactError, match=MANIFEST):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(["recsql"]),
        json.dumps({"format": "recsql", "kind": "mfblock", "format_version": "one"}),
    ],
)
def test_read_manifest_refuses_odd_json(tmp_path: Path, text: str) -> None:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(ArtifactError, match=MANIFEST):
        read_manifest(tmp_path)


def test_load_model_errors(tmp_path: Path, saved) -> None:
    with pytest.raises(ArtifactError, match="model directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no recsql.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    write_manifest(tmp_path / "odd", "transformer-xl")
    with pytest.raises(ArtifactError, match="unknown model kind 'transformer-xl'"):
        load_model(tmp_path / "odd")
    model_dir = saved[0]
    (model_dir / "product_index.csv").unlink()
    with pytest.raises(ArtifactError, match="product_index.csv: index file missing"):
        load_model(model_dir)


def test_load_model_refuses_bad_weights_and_rows(saved) -> None:
    model_dir = saved[0]
    (model_dir / "user_index.csv").write_text("user_id,user\n1,0\n2,99\n")
    with pytest.raises(ArtifactError, match="outside the 4-row embedding table"):
        load_model(model_dir)
    (model_dir / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ArtifactError, match="weights"):
        load_model(model_dir)


def test_read_index_errors(tmp_path: Path) -> None:
    path = tmp_path / "user_index.csv"
    path.write_text("customer,row\n1,0\n")
    with pytest.raises(ArtifactError, match="expected columns user_id,user"):
        read_index(path, "user_id", "user")
    path.write_text("user_id,user\nabc,0\n")
    with pytest.raises(ArtifactError, match="not an integer|cannot read the index"):
        read_index(path, "user_id", "user")


@pytest.mark.parametrize("body", ["1,0\n,1\n", "1,0\n2,\n", "1.5,0\n"])
def test_read_index_refuses_empty_and_fractional_fields(tmp_path: Path, body: str) -> None:
    path = tmp_path / "user_index.csv"
    path.write_text(f"user_id,user\n{body}")
    with pytest.raises(ArtifactError):
        read_index(path, "user_id", "user")


def _break_missing_tensor(model_dir: Path) -> None:
    tensors = load_file(str(model_dir / "weights.safetensors"))
    del tensors["dense_item.bias"]
    save_file(tensors, str(model_dir / "weights.safetensors"))


def _break_shape(model_dir: Path) -> None:
    tensors = load_file(str(model_dir / "weights.safetensors"))
    tensors["dense_user.weight"] = np.ascontiguousarray(tensors["dense_user.weight"][:, :2])
    save_file(tensors, str(model_dir / "weights.safetensors"))


def _break_duplicate_id(model_dir: Path) -> None:
    (model_dir / "user_index.csv").write_text("user_id,user\n1,0\n1,1\n")


@pytest.mark.parametrize("breaker", [_break_missing_tensor, _break_shape, _break_duplicate_id])
def test_load_model_refuses_inconsistent_artifacts(saved, breaker) -> None:
    model_dir = saved[0]
    breaker(model_dir)
    with pytest.raises(ArtifactError):
        load_model(model_dir)


def test_artifact_files_are_world_readable(saved) -> None:
    # safetensors' save_file writes 0600; the server image runs as another user than training
    model_dir = saved[0]
    for path in model_dir.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, path.name


def test_missing_weights_error_names_the_file_and_the_errno(saved) -> None:
    model_dir = saved[0]
    (model_dir / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"weights\.safetensors: cannot read weights \(No such"):
        load_model(model_dir)


def test_probability_model_needs_its_normalizer(saved) -> None:
    model_dir, weights, user_ids, product_ids = saved
    save_mfblock(
        model_dir, weights, user_ids, product_ids, score={"kind": "probability", "temperature": 1.0}
    )
    with pytest.raises(ArtifactError, match="user_log_normalizer"):
        load_model(model_dir)
    weights = {**weights, "user_log_normalizer": np.zeros(len(user_ids), np.float32)}
    save_mfblock(
        model_dir, weights, user_ids, product_ids, score={"kind": "probability", "temperature": 0}
    )
    with pytest.raises(ArtifactError, match="temperature"):
        load_model(model_dir)
