"""`recsql train`: the one place that picks how a run trains.

    one process                training/train.py (`train`)
    N local processes,         training/distributed.py (`launch`, `train_in_group`)
    or a torchrun worker
    a SageMaker training job   training/sagemaker.py (paths, hyperparameters, failure file),
                               then one of the above over SM_HOSTS x SM_NUM_GPUS

The modules it calls never import it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.errors import DataError, RecsqlError
from training.config import TrainConfig, config_from_args, resolve_device
from training.distributed import (
    is_torchrun_worker,
    launch,
    local_plan,
    sagemaker_plan,
    train_in_group,
)
from training.events import load_events
from training.results import baseline_table
from training.sagemaker import SageMakerEnv, input_paths, training_config, write_failure
from training.train import train

log = logging.getLogger(__name__)


def run_train_command(args: argparse.Namespace) -> int:
    if not args.inputs:
        env = SageMakerEnv.detect()
        if env is None:
            raise DataError(
                "no inputs: give event files/folders or a prepared folder "
                "(or run as `train` inside a SageMaker job, with /opt/ml)"
            )
        return run_training_job(env, progress=not args.no_progress)
    cfg = config_from_args(args)
    data = load_events(args.inputs, cfg.min_events, progress=not args.no_progress)
    # distributed hook (issue E): --nproc N, or a torchrun worker; None on ranks other than 0
    metrics = run_training(
        cfg,
        data,
        args.model_dir,
        nproc=args.nproc,
        inputs=args.inputs,
        progress=not args.no_progress,
    )
    if metrics is None:
        return 0
    final, pop = metrics["final"], metrics["popularity"]
    print(f"model: {args.model_dir} ({metrics['served_model']})")
    if cfg.objective == "mse":
        print(
            f"test MSE {final['test_mse']:.4f} (mean predictor {final['mean_mse']:.4f}), "
            f"train MSE {final['train_mse']:.4f}"
        )
    print(
        f"held out: HR@{cfg.k} {final['hr']:.4f} NDCG@{cfg.k} {final['ndcg']:.4f} at epoch "
        f"{final['epoch']} (popularity {pop['hr']:.4f} / {pop['ndcg']:.4f}, "
        f"{metrics['eval_users']} users)"
    )
    if "baselines" in metrics:
        print(baseline_table(final, metrics["baselines"], cfg.k))
        print(metrics["verdict"])
    refit = metrics.get("refit")
    if refit:
        print(f"refit on all {refit['events']:,} events for {refit['epochs']} epochs")
    print(f"{final['samples_per_s']:,.0f} samples/s")
    return 0


def run_training(
    cfg: TrainConfig,
    data: Any,
    model_dir: Path | None,
    *,
    nproc: int | None = 1,
    environ: Mapping[str, str] | None = None,
    inputs: list[Path] | None = None,
    progress: bool = True,
) -> dict | None:
    """Train on one process, N local ones, as a torchrun worker, or across SageMaker hosts.

    nproc: local processes (`--nproc`); None reads the SageMaker variables (SM_HOSTS...).
    Returns the metrics on the process that wrote the artifact (rank 0), None elsewhere.
    """
    environ = os.environ if environ is None else environ
    if is_torchrun_worker(environ):
        return train_in_group(cfg, data, model_dir, progress, environ)
    use_cuda = resolve_device(cfg.device).type == "cuda"
    plan = local_plan(nproc, use_cuda) if nproc is not None else sagemaker_plan(environ, use_cuda)
    if plan.world_size == 1:
        return train(cfg, data, model_dir, progress=progress)
    return launch(plan, cfg, data, model_dir, inputs=inputs, progress=progress)


def run_training_job(env: SageMakerEnv, progress: bool = False) -> int:
    """Train from the job's channels into its model dir; on failure write the reason, return 1."""
    try:
        cfg = training_config(env.hyperparameters())
        inputs = input_paths(env)
        log.info("SageMaker training job: inputs %s, config %s", inputs, cfg)
        data = load_events(inputs, cfg.min_events, progress=progress)
        # distributed hook (issue E): SM_HOSTS x SM_NUM_GPUS ranks; metrics None off rank 0
        metrics = run_training(
            cfg,
            data,
            env.model_dir,
            nproc=None,
            environ=env.environ,
            inputs=inputs,
            progress=progress,
        )
        if metrics is None:
            return 0
        env.output_data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(env.model_dir / "metrics.json", env.output_data_dir / "metrics.json")
    except Exception as exc:  # the job must leave a reason, whatever went wrong
        reason = str(exc) if isinstance(exc, RecsqlError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, RecsqlError):
            log.error("training failed\n%s", traceback.format_exc())
        write_failure(env, reason)
        return 1
    final = metrics["final"]
    mse = f", test MSE {final['test_mse']:.4f}" if "test_mse" in final else ""
    log.info("done: HR@%d %.4f, NDCG@%d %.4f%s", cfg.k, final["hr"], cfg.k, final["ndcg"], mse)
    return 0
