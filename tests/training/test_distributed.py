"""Distributed training: real process groups (gloo, loopback), against one-process training.

Why not exact equality with one process: N ranks train the same model (same permutation,
same global batch, same dropout stream, same update), but each rank sums its share of the
gradient and the all-reduce then sums the shares, so float additions happen in another order.
The weights differ by rounding (~1e-7 here) and the metrics by less than their printed digits.
The replicas themselves must be bit-identical: they apply the same all-reduced update.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from model.artifact import load_model
from model.errors import DataError
from training.config import make_config
from training.distributed import (
    LaunchPlan,
    is_torchrun_worker,
    launch,
    local_plan,
    sagemaker_plan,
)
from training.run import run_training
from training.train import train

from .test_train import planted_events

ROOT = Path(__file__).resolve().parents[2]
BASE = make_config(
    {
        "objective": "mse",
        "epochs": 3,
        "batch_size": 256,
        "num_embeddings": 16,
        "eval_users": 0,
        "device": "cpu",
        "threads": 1,
        "refit": False,  # distributed runs serve the validated model; compare like with like
    }
)  # the seed's sgd + momentum 0.9 and dropout 0.5


@pytest.fixture(scope="module")
def planted():
    return planted_events()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_model(one: Path, many: Path, atol: float = 1e-5) -> None:
    a, b = load_file(one / "weights.safetensors"), load_file(many / "weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert np.allclose(a[name], b[name], rtol=0, atol=atol), (name, np.abs(a[name] - b[name]))


def _assert_same_quality(one: dict, many: dict) -> None:
    for f1, f2 in zip(one["epochs"], many["epochs"], strict=True):
        assert f2["train_loss"] == pytest.approx(f1["train_loss"], rel=1e-5)
        assert f2["test_mse"] == pytest.approx(f1["test_mse"], rel=1e-5)
        assert f2["hr"] == pytest.approx(f1["hr"], abs=0.01)
        assert f2["ndcg"] == pytest.approx(f1["ndcg"], abs=0.01)


def test_two_ranks_train_the_one_process_model_with_identical_replicas(planted, tmp_path):
    one = train(BASE, planted, tmp_path / "one", progress=False)
    many = launch(
        local_plan(2),
        BASE,
        planted,
        tmp_path / "two",
        progress=False,
        replica_dir=tmp_path / "replicas",
    )
    assert many["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "global_batch": 256,
        "per_rank_batch": 128,
        "replica_resyncs": 0,
    }
    # it learned something, and the same thing as one process did
    assert many["final"]["test_mse"] < many["epochs"][0]["test_mse"] + 0.5
    _assert_same_quality(one, many)
    _assert_same_model(tmp_path / "one", tmp_path / "two")
    # the replicas are bit-identical, optimiser state included, and rank 0 saved its own
    r0 = load_file(tmp_path / "replicas" / "replica-0.safetensors")
    r1 = load_file(tmp_path / "replicas" / "replica-1.safetensors")
    assert r0.keys() == r1.keys() and any(k.startswith("state.") for k in r0)
    for name in r0:
        assert np.array_equal(r0[name], r1[name]), name
    saved = load_file(tmp_path / "two" / "weights.safetensors")
    assert np.array_equal(saved["user_embeddings.weight"], r0["user_embeddings.weight"])
    # the artifact serves
    model = load_model(tmp_path / "two")
    assert np.isfinite(model.score(planted.user_ids[:5], planted.product_ids[:5])).all()


def test_sagemaker_two_hosts_on_loopback_only_the_master_writes(planted, tmp_path):
    """Two 'instances' (one process each, BPR + adagrad + wd); the last global batch of one row
    leaves rank 0 with an empty slice. Host algo-2 must write nothing."""
    cfg = replace(BASE, objective="bpr", opt="adagrad", lr=0.05, wd=1e-4, batch_size=821)
    assert len(planted.train_labels) % cfg.batch_size == 1
    one = train(cfg, planted, tmp_path / "one", progress=False)
    port = str(_free_port())
    results: dict[str, object] = {}

    def host(name: str) -> None:
        env = {
            "SM_HOSTS": '["127.0.0.1", "algo-2"]',
            "SM_CURRENT_HOST": name,
            "SM_NUM_GPUS": "0",
            "MASTER_PORT": port,
        }
        try:
            results[name] = launch(
                sagemaker_plan(env), cfg, planted, tmp_path / name, progress=False
            )
        except Exception as exc:  # reported below
            results[name] = exc

    threads = [threading.Thread(target=host, args=(n,)) for n in ("127.0.0.1", "algo-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results["algo-2"] is None
    assert not (tmp_path / "algo-2").exists()
    many = results["127.0.0.1"]
    assert isinstance(many, dict), many
    assert many["distributed"]["world_size"] == 2 and many["distributed"]["replica_resyncs"] == 0
    _assert_same_quality(one, many)
    _assert_same_model(tmp_path / "one", tmp_path / "127.0.0.1")
    manifest = json.loads((tmp_path / "127.0.0.1" / "recsql.json").read_text())
    assert manifest["train_config"]["batch_size"] == 821


def test_torchrun_runs_the_train_command_on_two_workers(planted, tmp_path):
    planted.save(tmp_path / "prepared")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "recsql_cli",
        "train",
        str(tmp_path / "prepared"),
        "--model-dir",
        str(tmp_path / "model"),
        "--objective",
        "mse",
        "--epochs",
        "1",
        "--num-embeddings",
        "8",
        "--eval-users",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("model: ") == 1  # rank 0 alone reports
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["distributed"]["world_size"] == 2
    assert metrics["final"]["test_mse"] < 10


def test_launch_plan_from_sagemaker_variables():
    env = {
        "SM_HOSTS": '["algo-1", "algo-2", "algo-3"]',
        "SM_CURRENT_HOST": "algo-3",
        "SM_NUM_GPUS": "8",
    }
    plan = sagemaker_plan(env)
    assert plan == LaunchPlan(
        nnodes=3,
        node_rank=2,
        nproc_per_node=8,
        master_addr="algo-1",
        master_port=29500,
        backend="nccl",
    )
    assert plan.world_size == 24 and plan.rank(0) == 16 and plan.rank(7) == 23
    cpu = sagemaker_plan(
        {**env, "SM_CURRENT_HOST": "algo-1", "SM_NUM_GPUS": "0", "MASTER_PORT": "7777"}
    )
    assert (cpu.node_rank, cpu.nproc_per_node, cpu.backend, cpu.master_port) == (0, 1, "gloo", 7777)
    single = sagemaker_plan({})  # a one-instance job without the toolkit's variables
    assert single.world_size == 1
    assert sagemaker_plan(env, use_cuda=False).backend == "gloo"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-9"}, "not in SM_HOSTS"),
        ({"SM_HOSTS": "algo-1,algo-2"}, "JSON list"),
        ({"SM_HOSTS": "[]"}, "non-empty JSON list"),
        ({"SM_HOSTS": '["algo-1"]', "SM_NUM_GPUS": "eight"}, "SM_NUM_GPUS must be an integer"),
        ({"SM_HOSTS": '["algo-1"]', "MASTER_PORT": "-1"}, "MASTER_PORT must be >= 0"),
    ],
)
def test_bad_sagemaker_variables_are_clear_errors(env, message):
    with pytest.raises(DataError, match=message):
        sagemaker_plan(env)


def test_local_plans_torchrun_detection_and_refusals(planted, tmp_path):
    assert local_plan(4).world_size == 4 and local_plan(4, use_cuda=True).backend == "nccl"
    with pytest.raises(DataError, match="--nproc must be >= 1"):
        local_plan(0)
    assert is_torchrun_worker({"RANK": "0", "WORLD_SIZE": "2"})
    assert not is_torchrun_worker({"SM_HOSTS": '["algo-1"]'})
    with pytest.raises(DataError, match="--update lazy"):
        run_training(replace(BASE, update="dense"), planted, tmp_path, nproc=2, environ={})
    with pytest.raises(DataError, match="MASTER_PORT"):
        launch(LaunchPlan(2, 0, 1, "algo-1", 0, "gloo"), BASE, planted, tmp_path)


def test_softmax_is_refused_on_several_processes_with_the_way_out(planted, tmp_path):
    with pytest.raises(DataError, match="--nproc 1"):
        run_training(make_config({"device": "cpu"}), planted, tmp_path, nproc=2, environ={})
