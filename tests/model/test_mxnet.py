"""The seed's MXNet MFBlock artifact, read without MXNet.

The `model.params` files here are written byte by byte by a small writer that
follows MXNet's source (src/ndarray/ndarray.cc NDArray::Save, dmlc-core's
serializer.h) rather than model/mxnet.py's reader.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import load_model
from model.errors import ArtifactError
from model.mfblock import MFBlock
from model.mxnet import mfblock_weights, read_ndarray_file

# --- an independent writer for mx.nd.save files ------------------------------------------

TYPE_FLAGS = {"float32": 0, "float64": 1, "float16": 2, "uint8": 3, "int32": 4, "int64": 6}
MAGICS = {"V1": 0xF993FAC8, "V2": 0xF993FAC9, "V3": 0xF993FACA}


def ndarray_record(
    array: np.ndarray | None,
    version: str = "V2",
    stype: int = 0,
    dev_type: int = 1,
    flag: int | None = None,
) -> bytes:
    """One NDArray as NDArray::Save writes it (None: a "none" array)."""
    out = b""
    if version in ("V2", "V3"):
        out += struct.pack("<I", MAGICS[version]) + struct.pack("<i", stype)
    elif version == "V1":
        out += struct.pack("<I", MAGICS[version])
    if array is None:
        ndim = -1 if version == "V3" else 0
        return out + struct.pack("<i" if version != "legacy" else "<I", ndim)
    if version == "legacy":  # no magic: uint32 ndim, uint32 dims
        out += struct.pack("<I", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
    else:
        out += struct.pack("<i", array.ndim) + struct.pack(f"<{array.ndim}q", *array.shape)
    out += struct.pack("<ii", dev_type, 0)
    out += struct.pack("<i", TYPE_FLAGS[array.dtype.name] if flag is None else flag)
    return out + array.astype(array.dtype.newbyteorder("<")).tobytes(order="C")


def ndarray_file(records: list[bytes], names: list[str]) -> bytes:
    """The list container: magic 0x112, reserved, vector<NDArray>, vector<string>."""
    out = struct.pack("<QQ", 0x112, 0) + struct.pack("<Q", len(records)) + b"".join(records)
    out += struct.pack("<Q", len(names))
    for name in names:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw
    return out


STRUCTURAL = {
    "user_embeddings.weight": "user_embeddings.weight",
    "item_embeddings.weight": "item_embeddings.weight",
    "dense_user.weight": "dense_user.weight",
    "dense_user.bias": "dense_user.bias",
    "dense_item.weight": "dense_item.weight",
    "dense_item.bias": "dense_item.bias",
}
PREFIXED = {  # save_params / export names, by creation order in MFBlock.__init__
    "user_embeddings.weight": "mfblock0_embedding0_weight",
    "item_embeddings.weight": "mfblock0_embedding1_weight",
    "dense_user.weight": "mfblock0_dense0_weight",
    "dense_user.bias": "mfblock0_dense0_bias",
    "dense_item.weight": "mfblock0_dense1_weight",
    "dense_item.bias": "mfblock0_dense1_bias",
}
NAMINGS = {
    "structural": STRUCTURAL,
    "prefixed": PREFIXED,
    "stripped": {k: v.removeprefix("mfblock0_") for k, v in PREFIXED.items()},
    "arg": {k: "arg:" + v for k, v in PREFIXED.items()},
}

NUM_USERS, NUM_ITEMS, NUM_EMB = 5, 7, 4
USER_IDS = np.array([1001, 50, 7, 9_007_199_254_740_993, 3], dtype=np.int64)
USER_ROWS = np.array([2, 0, 4, 1, 3])
ITEM_IDS = np.array([10, 20, 30, 40, 50, 60, 70], dtype=np.int64) * 11
ITEM_ROWS = np.array([6, 5, 4, 3, 2, 1, 0])


def make_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "user_embeddings.weight": rng.normal(size=(NUM_USERS, NUM_EMB)).astype(np.float32),
        "item_embeddings.weight": rng.normal(size=(NUM_ITEMS, NUM_EMB)).astype(np.float32),
        # Dense weight is (units, in_units); a non-square would be caught, but MFBlock's is square
        "dense_user.weight": rng.normal(size=(NUM_EMB, NUM_EMB)).astype(np.float32),
        "dense_user.bias": rng.normal(0.5, 0.1, size=NUM_EMB).astype(np.float32),
        "dense_item.weight": rng.normal(size=(NUM_EMB, NUM_EMB)).astype(np.float32),
        "dense_item.bias": rng.normal(0.5, 0.1, size=NUM_EMB).astype(np.float32),
    }


def write_seed_dir(
    model_dir: Path,
    weights: dict[str, np.ndarray],
    naming: str = "prefixed",
    version: str = "V2",
    user_index: str = "user_index.csv",
) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    names = NAMINGS[naming]
    order = list(weights)[::-1]  # not the reader's order: mapping must not depend on it
    records = [ndarray_record(weights[k], version) for k in order]
    (model_dir / "model.params").write_bytes(ndarray_file(records, [names[k] for k in order]))
    block = {"max_users": NUM_USERS, "max_items": NUM_ITEMS, "num_emb": NUM_EMB, "dropout_p": 0.5}
    (model_dir / "MFBlock.params").write_text(json.dumps(block))
    id_col = "customer_id" if user_index.startswith("customer") else "user_id"
    users = "".join(f"{i},{r}\n" for i, r in zip(USER_IDS, USER_ROWS, strict=True))
    (model_dir / user_index).write_text(f"{id_col},user\n{users}")
    items = "".join(f"{i},{r}\n" for i, r in zip(ITEM_IDS, ITEM_ROWS, strict=True))
    (model_dir / "product_index.csv").write_text(f"product_id,item\n{items}")
    return model_dir


def reference_scores(weights: dict[str, np.ndarray], user_rows, item_rows) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    a = np.maximum(w["user_embeddings.weight"] @ w["dense_user.weight"].T + w["dense_user.bias"], 0)
    b = np.maximum(w["item_embeddings.weight"] @ w["dense_item.weight"].T + w["dense_item.bias"], 0)
    return np.sum(a[user_rows] * b[item_rows], axis=1)


def all_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    u, i = np.meshgrid(np.arange(NUM_USERS), np.arange(NUM_ITEMS), indexing="ij")
    u, i = u.ravel(), i.ravel()
    return USER_IDS[u], ITEM_IDS[i], USER_ROWS[u], ITEM_ROWS[i]


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("naming", sorted(NAMINGS))
@pytest.mark.parametrize("version", ["legacy", "V1", "V2", "V3"])
def test_seed_artifact_scores_match_numpy(tmp_path: Path, naming: str, version: str) -> None:
    weights = make_weights()
    model = load_model(write_seed_dir(tmp_path / "m", weights, naming, version))
    user_ids, item_ids, user_rows, item_rows = all_pairs()
    got = model.score(user_ids, item_ids)
    np.testing.assert_allclose(got, reference_scores(weights, user_rows, item_rows), rtol=1e-5)
    assert np.count_nonzero(got) > len(got) // 2  # the towers are not all dead
    assert model.describe()["source"] == "mxnet-seed"
    assert model.info["ndarray_format"] == ("pre-V1" if version == "legacy" else version)


def test_unknown_ids_score_nan(tmp_path: Path) -> None:
    model = load_model(write_seed_dir(tmp_path / "m", make_weights()))
    scores = model.score(np.array([1001, 1001, 424242, 424242]), np.array([110, 9, 110, 9]))
    assert np.isfinite(scores[0])
    assert np.isnan(scores[1:]).all()


def test_generated_names_map_by_block_number_not_file_order(tmp_path: Path) -> None:
    """A model built without a fresh name scope: mfblock3_embedding9/embedding10, dense11/12."""
    weights = make_weights(3)
    names = {
        "user_embeddings.weight": "mfblock3_embedding9_weight",
        "item_embeddings.weight": "mfblock3_embedding10_weight",
        "dense_user.weight": "mfblock3_dense11_weight",
        "dense_user.bias": "mfblock3_dense11_bias",
        "dense_item.weight": "mfblock3_dense12_weight",
        "dense_item.bias": "mfblock3_dense12_bias",
    }
    order = ["dense_item.bias", "user_embeddings.weight", "dense_user.bias", "dense_item.weight",
             "item_embeddings.weight", "dense_user.weight"]  # fmt: skip
    data = ndarray_file([ndarray_record(weights[k]) for k in order], [names[k] for k in order])
    mapped = mfblock_weights(_parse(tmp_path, data))
    for key, value in weights.items():
        np.testing.assert_array_equal(mapped[key], value)


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_other_float_dtypes_become_float32(tmp_path: Path, dtype: str) -> None:
    weights = {k: v.astype(dtype) for k, v in make_weights(1).items()}
    model = load_model(write_seed_dir(tmp_path / "m", weights))
    assert model.user_vectors.dtype == np.float32
    user_ids, item_ids, user_rows, item_rows = all_pairs()
    expected = reference_scores(weights, user_rows, item_rows)
    np.testing.assert_allclose(model.score(user_ids, item_ids), expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_is_widened(tmp_path: Path) -> None:
    values = np.array([1.0, -2.5, 0.15625, 2.0**100], dtype=np.float32)
    upper_halves = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact in bfloat16
    data = ndarray_file([ndarray_record(upper_halves, flag=12)], ["w"])
    np.testing.assert_array_equal(_parse(tmp_path, data)["w"], values)


def test_gpu_context_and_customer_index_are_accepted(tmp_path: Path) -> None:
    weights = make_weights(2)
    model_dir = write_seed_dir(tmp_path / "m", weights, user_index="customer_index.csv")
    names = PREFIXED
    records = [ndarray_record(v, dev_type=2) for v in weights.values()]
    (model_dir / "model.params").write_bytes(ndarray_file(records, [names[k] for k in weights]))
    model = load_model(model_dir)
    user_ids, item_ids, user_rows, item_rows = all_pairs()
    expected = reference_scores(weights, user_rows, item_rows)
    np.testing.assert_allclose(model.score(user_ids, item_ids), expected, rtol=1e-5)


def test_seed_scores_match_torch_mfblock_in_eval_mode(tmp_path: Path) -> None:
    weights = make_weights(4)
    model = load_model(write_seed_dir(tmp_path / "m", weights))
    net = MFBlock(NUM_USERS, NUM_ITEMS, NUM_EMB, dropout_p=0.5)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    net.eval()
    user_ids, item_ids, user_rows, item_rows = all_pairs()
    with torch.no_grad():
        expected = net(torch.from_numpy(user_rows), torch.from_numpy(item_rows)).numpy()
    np.testing.assert_allclose(model.score(user_ids, item_ids), expected, rtol=1e-5, atol=1e-6)
    ids, scores = model.top_k(int(USER_IDS[0]), k=3)
    best_rows = np.argsort(-expected[:NUM_ITEMS], kind="stable")[:3]
    np.testing.assert_array_equal(ids, item_ids[best_rows])


# --- refusals -------------------------------------------------------------------------------


def _parse(tmp_path: Path, data: bytes) -> dict[str, np.ndarray | None]:
    path = tmp_path / "model.params"
    path.write_bytes(data)
    return read_ndarray_file(path)[0]


def _valid_records(weights=None, version="V2") -> tuple[list[bytes], list[str]]:
    weights = make_weights() if weights is None else weights
    return [ndarray_record(v, version) for v in weights.values()], [PREFIXED[k] for k in weights]


def _expect_refusal(tmp_path: Path, data: bytes, match: str) -> None:
    model_dir = write_seed_dir(tmp_path / "m", make_weights())
    (model_dir / "model.params").write_bytes(data)
    with pytest.raises(ArtifactError, match=match):
        load_model(model_dir)


def test_truncated_files_are_refused_at_every_length(tmp_path: Path) -> None:
    records, names = _valid_records()
    data = ndarray_file(records, names)
    path = tmp_path / "model.params"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="model.params"):
            read_ndarray_file(path)
    _expect_refusal(tmp_path, data[:-3], "truncated|file ends")


def test_trailing_garbage_is_refused(tmp_path: Path) -> None:
    records, names = _valid_records()
    _expect_refusal(tmp_path, ndarray_file(records, names) + b"\0", "unexpected bytes after")


def test_bad_file_magic(tmp_path: Path) -> None:
    records, names = _valid_records()
    data = bytearray(ndarray_file(records, names))
    data[0] = 0x13
    _expect_refusal(tmp_path, bytes(data), "not an MXNet NDArray file")
    _expect_refusal(tmp_path, b"PK\x03\x04" + bytes(40), "not an MXNet NDArray file")


def test_bad_ndarray_magic(tmp_path: Path) -> None:
    records, names = _valid_records()
    records[2] = struct.pack("<I", 0xDEADBEEF) + records[2][4:]
    _expect_refusal(tmp_path, ndarray_file(records, names), "array 2 has an unknown NDArray magic")


@pytest.mark.parametrize("stype, kind", [(1, "row-sparse"), (2, "CSR")])
def test_sparse_storage_is_refused(tmp_path: Path, stype: int, kind: str) -> None:
    records, names = _valid_records()
    records[0] = ndarray_record(make_weights()["user_embeddings.weight"], stype=stype)
    _expect_refusal(tmp_path, ndarray_file(records, names), f"{kind} storage")


def test_missing_tensor(tmp_path: Path) -> None:
    records, names = _valid_records()
    _expect_refusal(tmp_path, ndarray_file(records[:-1], names[:-1]), "missing.*dense_item.bias")


def test_missing_structural_tensor(tmp_path: Path) -> None:
    weights = make_weights()
    del weights["item_embeddings.weight"]
    records = [ndarray_record(v) for v in weights.values()]
    data = ndarray_file(records, list(weights))
    _expect_refusal(tmp_path, data, "missing.*item_embeddings.weight")


def test_extra_tensor(tmp_path: Path) -> None:
    records, names = _valid_records()
    records.append(ndarray_record(np.zeros(3, np.float32)))
    _expect_refusal(tmp_path, ndarray_file(records, names + ["mfblock0_dense2_bias"]), "dense")
    records[-1] = ndarray_record(np.zeros(3, np.float32))
    _expect_refusal(tmp_path, ndarray_file(records, names + ["mfblock0_batchnorm0_gamma"]),
                    "unexpected parameter 'mfblock0_batchnorm0_gamma'")  # fmt: skip


def test_wrong_shape(tmp_path: Path) -> None:
    weights = make_weights()
    weights["dense_user.weight"] = weights["dense_user.weight"][:, :3]
    records, names = _valid_records(weights)
    _expect_refusal(tmp_path, ndarray_file(records, names), r"dense_user.weight has shape \(4, 3\)")


def test_tables_swapped_against_block_params(tmp_path: Path) -> None:
    weights = make_weights()
    names = dict(PREFIXED)
    names["user_embeddings.weight"], names["item_embeddings.weight"] = (
        names["item_embeddings.weight"],
        names["user_embeddings.weight"],
    )
    data = ndarray_file([ndarray_record(v) for v in weights.values()], [names[k] for k in weights])
    _expect_refusal(tmp_path, data, r"user_embeddings.weight has shape \(7, 4\)")


def test_integer_dtype_and_unknown_flag(tmp_path: Path) -> None:
    weights = make_weights()
    weights["dense_item.bias"] = np.arange(NUM_EMB, dtype=np.int32)
    records, names = _valid_records(weights)
    _expect_refusal(tmp_path, ndarray_file(records, names), "dtype int32")
    records[0] = ndarray_record(make_weights()["user_embeddings.weight"], flag=99)
    _expect_refusal(tmp_path, ndarray_file(records, names), "unknown type flag 99")


def test_unknown_device_type(tmp_path: Path) -> None:
    records, names = _valid_records()
    records[1] = ndarray_record(make_weights()["item_embeddings.weight"], dev_type=7)
    _expect_refusal(tmp_path, ndarray_file(records, names), "unknown device type 7")


def test_names_must_match_arrays(tmp_path: Path) -> None:
    records, names = _valid_records()
    _expect_refusal(tmp_path, ndarray_file(records, []), "no names")
    _expect_refusal(tmp_path, ndarray_file(records, names[:3]), "6 arrays but 3 names")
    _expect_refusal(tmp_path, ndarray_file(records, names[:5] + names[:1]), "names repeat")


@pytest.mark.parametrize("version", ["V2", "V3", "legacy"])
def test_none_array_is_refused(tmp_path: Path, version: str) -> None:
    records, names = _valid_records(version=version)
    records[3] = ndarray_record(None, version)
    _expect_refusal(tmp_path, ndarray_file(records, names), "is empty")


def test_nan_weights_are_refused(tmp_path: Path) -> None:
    weights = make_weights()
    weights["item_embeddings.weight"][2, 1] = np.nan
    records, names = _valid_records(weights)
    _expect_refusal(tmp_path, ndarray_file(records, names), "NaN or infinity")


def test_block_params_and_index_checks(tmp_path: Path) -> None:
    model_dir = write_seed_dir(tmp_path / "m", make_weights())
    block = json.loads((model_dir / "MFBlock.params").read_text())
    (model_dir / "MFBlock.params").write_text(json.dumps({**block, "num_emb": 8}))
    with pytest.raises(ArtifactError, match=r"implies \(5, 8\)"):
        load_model(model_dir)
    (model_dir / "MFBlock.params").write_text(json.dumps({**block, "max_items": "7"}))
    with pytest.raises(ArtifactError, match="max_items must be a positive integer"):
        load_model(model_dir)
    (model_dir / "MFBlock.params").write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read the MFBlock settings"):
        load_model(model_dir)
    (model_dir / "MFBlock.params").write_text(json.dumps(block))

    (model_dir / "product_index.csv").write_text("product_id,item\n5,0\n6,7\n")
    with pytest.raises(ArtifactError, match="outside the 7-row embedding table"):
        load_model(model_dir)
    (model_dir / "product_index.csv").write_text("product_id,item\n5,0\n5,1\n")
    with pytest.raises(ArtifactError, match="ids repeat"):
        load_model(model_dir)
    (model_dir / "product_index.csv").write_text("product_id,item\n5,1\n6,1\n")
    with pytest.raises(ArtifactError, match="share one embedding row"):
        load_model(model_dir)
    (model_dir / "product_index.csv").unlink()
    with pytest.raises(ArtifactError, match="index file missing"):
        load_model(model_dir)
    (model_dir / "model.params").unlink()
    with pytest.raises(ArtifactError, match="model.params missing"):
        load_model(model_dir)


def test_index_may_cover_part_of_the_table(tmp_path: Path) -> None:
    model_dir = write_seed_dir(tmp_path / "m", make_weights())
    (model_dir / "user_index.csv").write_text("user_id,user\n77,4\n")
    model = load_model(model_dir)
    assert np.isfinite(model.score(np.array([77]), np.array([110])))[0]
    assert np.isnan(model.score(np.array([1001]), np.array([110])))[0]


# --- any bytes: a model or an ArtifactError, never anything else ---------------------------

_VALID = ndarray_file(*_valid_records(version="V2"))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, len(_VALID))),
)
def test_mutated_files_never_crash(
    tmp_path: Path, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(_VALID)
    for pos, value in edits:
        data[pos] = value
    try:
        mfblock_weights(_parse(tmp_path, bytes(data[:cut])))
    except ArtifactError:
        pass


# --- files written by real MXNet --------------------------------------------------------------
# Made once with mxnet 1.9.1 (pip) from the seed's MFBlock class: MFBlock(3, 4, num_emb=2), the
# second block built in the process (so its prefix is `mfblock1_`), Xavier(magnitude=3) weights,
# biases set to [0.1, 0.4]. `save_params` writes prefix-stripped names; `export` writes
# `arg:mfblock1_...` in graph order. MXNET_SCORES is net(users, items) for rows 0-2 x 0-3.

REAL_SAVE_PARAMS = (
    "EgEAAAAAAAAAAAAAAAAAAAYAAAAAAAAAyfqT+QAAAAACAAAAAwAAAAAAAAACAAAAAAAAAAEAAAAAAAAAAAAAAFxG"
    "IL7kK2o/HrwsP/KSiz+Q/Qs/xsPnvsn6k/kAAAAAAgAAAAQAAAAAAAAAAgAAAAAAAAABAAAAAAAAAAAAAAA4/kG+"
    "3t89v/qr5r74Vl4+HE5Mvn43Xj+A0gc8+oUMP8n6k/kAAAAAAgAAAAIAAAAAAAAAAgAAAAAAAAABAAAAAAAAAAAA"
    "AAB/mJc/uP2iPgDqWr6QZRg+yfqT+QAAAAABAAAAAgAAAAAAAAABAAAAAAAAAAAAAADNzMw9zczMPsn6k/kAAAAA"
    "AgAAAAIAAAAAAAAAAgAAAAAAAAABAAAAAAAAAAAAAACqyRi/TCbgPtImaT/Q94O/yfqT+QAAAAABAAAAAgAAAAAA"
    "AAABAAAAAAAAAAAAAADNzMw9zczMPgYAAAAAAAAAEQAAAAAAAABlbWJlZGRpbmcwX3dlaWdodBEAAAAAAAAAZW1i"
    "ZWRkaW5nMV93ZWlnaHQNAAAAAAAAAGRlbnNlMF93ZWlnaHQLAAAAAAAAAGRlbnNlMF9iaWFzDQAAAAAAAABkZW5z"
    "ZTFfd2VpZ2h0CwAAAAAAAABkZW5zZTFfYmlhcw=="
)
REAL_EXPORT = (
    "EgEAAAAAAAAAAAAAAAAAAAYAAAAAAAAAyfqT+QAAAAACAAAAAwAAAAAAAAACAAAAAAAAAAEAAAAAAAAAAAAAAFxG"
    "IL7kK2o/HrwsP/KSiz+Q/Qs/xsPnvsn6k/kAAAAAAgAAAAIAAAAAAAAAAgAAAAAAAAABAAAAAAAAAAAAAAB/mJc/"
    "uP2iPgDqWr6QZRg+yfqT+QAAAAABAAAAAgAAAAAAAAABAAAAAAAAAAAAAADNzMw9zczMPsn6k/kAAAAAAgAAAAQA"
    "AAAAAAAAAgAAAAAAAAABAAAAAAAAAAAAAAA4/kG+3t89v/qr5r74Vl4+HE5Mvn43Xj+A0gc8+oUMP8n6k/kAAAAA"
    "AgAAAAIAAAAAAAAAAgAAAAAAAAABAAAAAAAAAAAAAACqyRi/TCbgPtImaT/Q94O/yfqT+QAAAAABAAAAAgAAAAAA"
    "AAABAAAAAAAAAAAAAADNzMw9zczMPgYAAAAAAAAAHgAAAAAAAABhcmc6bWZibG9jazFfZW1iZWRkaW5nMF93ZWln"
    "aHQaAAAAAAAAAGFyZzptZmJsb2NrMV9kZW5zZTBfd2VpZ2h0GAAAAAAAAABhcmc6bWZibG9jazFfZGVuc2UwX2Jp"
    "YXMeAAAAAAAAAGFyZzptZmJsb2NrMV9lbWJlZGRpbmcxX3dlaWdodBoAAAAAAAAAYXJnOm1mYmxvY2sxX2RlbnNl"
    "MV93ZWlnaHQYAAAAAAAAAGFyZzptZmJsb2NrMV9kZW5zZTFfYmlhcw=="
)
MXNET_SCORES = [
    [0.56512576, 0.09549242, 0.12330972, 0.06902698],
    [0.41475198, 0.57819581, 0.74662644, 0.41795057],
    [0.21403429, 0.28001019, 0.36157826, 0.20240621],
]


@pytest.mark.parametrize("blob", [REAL_SAVE_PARAMS, REAL_EXPORT], ids=["save_params", "export"])
def test_files_written_by_mxnet_score_like_mxnet(tmp_path: Path, blob: str) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.params").write_bytes(base64.b64decode(blob))
    block = {"max_users": 3, "max_items": 4, "num_emb": 2, "dropout_p": 0.5}
    (model_dir / "MFBlock.params").write_text(json.dumps(block))
    (model_dir / "user_index.csv").write_text("user_id,user\n100,0\n101,1\n102,2\n")
    (model_dir / "product_index.csv").write_text("product_id,item\n200,0\n201,1\n202,2\n203,3\n")
    model = load_model(model_dir)
    users = np.repeat([100, 101, 102], 4)
    items = np.tile([200, 201, 202, 203], 3)
    np.testing.assert_allclose(model.score(users, items), np.ravel(MXNET_SCORES), rtol=1e-6)
