"""Data-parallel MFBlock training on several processes, GPUs or hosts (torch.distributed).

    recsql train --nproc 2 prepared/            N local processes (gloo on CPU, nccl on CUDA)
    torchrun --nproc-per-node 8 -m recsql_cli train prepared/     a torchrun worker each
    docker run IMAGE train  (SageMaker, several instances or GPUs)  SM_HOSTS / SM_NUM_GPUS

How a step is shared. Every rank holds the whole training set and draws the same permutation
from the shared seed, so every rank knows the *global* batch (`--batch-size` rows, the same
flag as one process) and takes its contiguous slice of it. Before the forward pass each rank
catches up (lazy momentum) every row the global batch touches, an identical computation on
every rank. After the backward pass each rank scatters its gradients into one buffer indexed
by the global batch's unique rows, [dense tower grads | user rows | item rows], scaled by its
share of the batch, and ONE all-reduce per step sums it; every rank then applies the same
update (steps.FusedStep's optimiser code) to the same rows. Dropout masks are drawn for the
whole global batch on every rank (the same random stream as one process) and sliced.

So the replicas stay bit-identical by construction (checked on CPU/gloo in the tests, and by a
fingerprint after every epoch: a rank that drifts, e.g. through CUDA atomics in index_add_,
is overwritten by rank 0's tables and counted in metrics["distributed"]["replica_resyncs"]),
and N processes train the *same* model as one process with the same --batch-size, up to float
summation order (gradients are summed per rank, then across ranks): measured weight
differences are ~1e-6 after several epochs, well inside the tests' tolerance.

Why replicated tables, and when to shard. MFBlock at 64 dims, fp32: 3M users x 256 B =
768 MB, 180k items = 46 MB, plus the same again for momentum state: ~1.6 GB per replica, a
small part of any training GPU (16-80 GB). A step moves (|touched users| + |touched items|)
x 256 B + 33 KB: at a 64k global batch at most ~33 MB, against 1.6 GB for an all-reduce of
dense table gradients (what DDP would do). Replication stops paying when the tables plus
state outgrow about half a device's memory: ~25M users at 64 dims on a 40 GB GPU, or wider
embeddings. Sharding would then be row-wise: rank r owns rows with id % N == r (tables and
momentum state), each step all-to-all's the batch's ids to their owners, the owners reply
with rows (forward) and receive gradient rows back (backward), and only the dense towers are
all-reduced (TorchRec's row-wise sharding). That is not implemented: nothing at REES46 scale
needs it.

Costs of this design: each rank holds the training ids (20 B/row: 2.2 GB for 110M events) and
does the global batch's `unique` and random bytes itself (cheap next to the step); the update
is the fused step's (update="lazy"); update="dense" is refused. Only rank 0 evaluates and
writes the artifact and metrics.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model.errors import DataError
from training.config import TrainConfig, resolve_device
from training.steps import FusedStep

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500  # torchrun's default MASTER_PORT
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------- launch plans


@dataclass(frozen=True)
class LaunchPlan:
    """Where this host's processes fit in the job: nnodes x nproc_per_node ranks."""

    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int  # 0: pick a free port at launch (single host only)
    backend: str  # "nccl" (CUDA) or "gloo" (CPU)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def rank(self, local_rank: int) -> int:
        return self.node_rank * self.nproc_per_node + local_rank


def _backend(use_cuda: bool) -> str:
    return "nccl" if use_cuda else "gloo"


def local_plan(nproc: int, use_cuda: bool = False, port: int = 0) -> LaunchPlan:
    """N processes on this machine, rendezvous on loopback."""
    if nproc < 1:
        raise DataError(f"--nproc must be >= 1, not {nproc}")
    return LaunchPlan(1, 0, nproc, "127.0.0.1", port, _backend(use_cuda))


def sagemaker_plan(environ: Mapping[str, str], use_cuda: bool | None = None) -> LaunchPlan:
    """SM_HOSTS (JSON list), SM_CURRENT_HOST, SM_NUM_GPUS -> this host's part of the job.

    The master is SM_HOSTS[0]; this host's node rank is its position in SM_HOSTS; one process
    per GPU (at least one). MASTER_PORT, when set, overrides the default port 29500.
    """
    try:
        hosts = json.loads(environ.get("SM_HOSTS") or '["localhost"]')
    except ValueError as exc:
        raise DataError(f"SM_HOSTS is not a JSON list of host names ({exc})") from exc
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise DataError(f"SM_HOSTS must be a non-empty JSON list of host names, not {hosts!r}")
    current = environ.get("SM_CURRENT_HOST") or hosts[0]
    if current not in hosts:
        raise DataError(f"SM_CURRENT_HOST {current!r} is not in SM_HOSTS {hosts}")
    gpus = _env_int(environ, "SM_NUM_GPUS", 0)
    port = _env_int(environ, "MASTER_PORT", DEFAULT_PORT)
    if use_cuda is None:
        use_cuda = gpus > 0
    return LaunchPlan(
        len(hosts), hosts.index(current), max(1, gpus), hosts[0], port, _backend(use_cuda)
    )


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DataError(f"{name} must be an integer, not {raw!r}") from None
    if value < 0:
        raise DataError(f"{name} must be >= 0, not {value}")
    return value


def is_torchrun_worker(environ: Mapping[str, str]) -> bool:
    """True inside a process that torchrun (or any env:// launcher) started."""
    return all(name in environ for name in ("RANK", "WORLD_SIZE"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- entry points


def _check_distributable(cfg: TrainConfig) -> None:
    if cfg.objective == "softmax":
        raise DataError(
            "distributed training runs the fused mse/bpr step; train --objective softmax "
            "(the default) with --nproc 1, on one GPU or the CPU"
        )
    if cfg.update != "lazy":
        raise DataError("distributed training runs the fused step: use --update lazy")


def launch(
    plan: LaunchPlan,
    cfg: TrainConfig,
    data: Any,
    model_dir: Path | None,
    *,
    inputs: list[Path] | None = None,
    progress: bool = True,
    replica_dir: Path | None = None,
) -> dict | None:
    """Spawn this host's processes and wait. Workers read a prepared folder: the given one, or
    `data` saved once into a temporary folder (not prepared again per rank)."""
    import torch.multiprocessing as mp

    from training.events import is_prepared_dir

    _check_distributable(cfg)
    if plan.master_port == 0:
        if plan.nnodes > 1:
            raise DataError("a multi-host launch needs a fixed MASTER_PORT")
        plan = LaunchPlan(**{**asdict(plan), "master_port": _free_port()})
    log.info(
        "launching %d of %d ranks (%s) via %s:%d",
        plan.nproc_per_node,
        plan.world_size,
        plan.backend,
        plan.master_addr,
        plan.master_port,
    )
    with tempfile.TemporaryDirectory(prefix="recsql-dist-") as tmp:
        if inputs and len(inputs) == 1 and is_prepared_dir(inputs[0]):
            data_dir = Path(inputs[0])
        else:
            data_dir = Path(tmp) / "prepared"
            data.save(data_dir)
        job = _Job(
            plan,
            cfg,
            str(data_dir),
            None if model_dir is None else str(model_dir),
            progress,
            None if replica_dir is None else str(replica_dir),
            logging.getLogger().getEffectiveLevel(),
        )
        try:
            mp.start_processes(
                _spawned_worker,
                args=(job,),
                nprocs=plan.nproc_per_node,
                join=True,
                start_method="spawn",
            )
        except mp.ProcessRaisedException as exc:
            last = exc.msg.strip().splitlines()[-1] if exc.msg.strip() else "unknown error"
            raise DataError(
                f"distributed training failed on local rank {exc.error_index}: {last}"
            ) from None
        except mp.ProcessExitedException as exc:
            raise DataError(
                f"distributed training: local rank {exc.error_index} exited with "
                f"code {exc.exit_code}"
            ) from None
    if plan.node_rank != 0 or model_dir is None:
        return None
    return json.loads((Path(model_dir) / "metrics.json").read_text())


@dataclass(frozen=True)
class _Job:
    plan: LaunchPlan
    cfg: TrainConfig
    data_dir: str
    model_dir: str | None
    progress: bool
    replica_dir: str | None
    log_level: int


def _spawned_worker(local_rank: int, job: _Job) -> None:
    import torch.distributed as dist

    from training.events import PreparedEvents

    plan = job.plan
    rank = plan.rank(local_rank)
    logging.basicConfig(
        level=job.log_level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s"
    )
    device = _rank_device(job.cfg, local_rank)
    dist.init_process_group(
        plan.backend,
        init_method=f"tcp://{plan.master_addr}:{plan.master_port}",
        rank=rank,
        world_size=plan.world_size,
        timeout=datetime.timedelta(minutes=60),
    )
    try:
        data = PreparedEvents.load(Path(job.data_dir))
        train_distributed(
            job.cfg,
            data,
            None if job.model_dir is None else Path(job.model_dir),
            device,
            progress=job.progress,
            replica_dir=None if job.replica_dir is None else Path(job.replica_dir),
        )
    finally:
        dist.destroy_process_group()


def train_in_group(
    cfg: TrainConfig, data: Any, model_dir: Path | None, progress: bool, environ: Mapping[str, str]
) -> dict | None:
    """Inside a torchrun worker: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from env."""
    import torch.distributed as dist

    missing = [name for name in _TORCHRUN_VARS if name not in environ]
    if missing:
        raise DataError(f"torchrun-style launch: {', '.join(missing)} not set")
    local_rank = _env_int(environ, "LOCAL_RANK", 0)
    device = _rank_device(cfg, local_rank)
    dist.init_process_group(
        _backend(device.type == "cuda"),
        init_method="env://",
        timeout=datetime.timedelta(minutes=60),
    )
    try:
        return train_distributed(cfg, data, model_dir, device, progress=progress)
    finally:
        dist.destroy_process_group()


def _rank_device(cfg: TrainConfig, local_rank: int) -> Any:
    import torch

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


# ---------------------------------------------------------------------------- the training


def train_distributed(
    cfg: TrainConfig,
    data: Any,
    model_dir: Path | None,
    device: Any,
    progress: bool = True,
    replica_dir: Path | None = None,
) -> dict | None:
    """One rank's part, in an initialised process group. Rank 0 evaluates and writes the
    artifact; returns the metrics there, None on other ranks. replica_dir (tests, debugging):
    every rank writes its parameters to replica-<rank>.safetensors."""
    import torch
    import torch.distributed as dist

    from training.results import EvalSet, epoch_metrics, run_metrics, save_artifact
    from training.train import build_model, device_arrays, run_epoch

    rank, world = dist.get_rank(), dist.get_world_size()
    _check_distributable(cfg)
    data = data.without_test_pairs()  # the seed's training set, as train() uses for mse/bpr
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    users, items, labels = device_arrays(data, device)
    _check_same_everywhere("training data", [users, items, labels.view(torch.int32)])
    _check_same_everywhere("initial weights", list(model.parameters()))
    step = ShardedStep(model, cfg, gen, rank, world)
    ev = EvalSet.build(cfg, data, model.num_users, model.num_items) if rank == 0 else None
    if rank == 0:
        log.info(
            "training %s on %d ranks (%s): %d users, %d items, %d events, global batch %d",
            cfg.objective,
            world,
            dist.get_backend(),
            model.num_users,
            model.num_items,
            len(labels),
            cfg.batch_size,
        )
    history, resyncs = [], 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        share, seconds = run_epoch(
            step,
            cfg,
            users,
            items,
            labels,
            model.num_items,
            gen,
            f"epoch {epoch}/{cfg.epochs}",
            progress and rank == 0,
        )
        step.flush()
        loss = torch.tensor([share], dtype=torch.float64, device=device)
        dist.all_reduce(loss)  # each rank returned its share of the mean loss
        resyncs += step.resync_if_drifted()
        if rank == 0:
            model.eval()
            row = {
                "epoch": epoch,
                "train_loss": float(loss),
                "seconds": seconds,
                "samples_per_s": len(labels) / seconds,
                **epoch_metrics(model, ev, device),
            }
            history.append(row)
            log.info(
                "epoch %d: loss %.4f, test MSE %.4f, HR@%d %.4f, %.0f samples/s",
                epoch,
                row["train_loss"],
                row["test_mse"],
                cfg.k,
                row["hr"],
                row["samples_per_s"],
            )
    if replica_dir is not None:
        _save_replica(model, step, Path(replica_dir), rank)
    if rank != 0:
        return None
    metrics = {
        **run_metrics(cfg, history, ev),
        "served_model": "validated model (distributed runs do not refit)",
        "distributed": {
            "world_size": world,
            "backend": dist.get_backend(),
            "global_batch": cfg.batch_size,
            "per_rank_batch": -(-cfg.batch_size // world),
            "replica_resyncs": resyncs,
        },
    }
    if model_dir is not None:
        save_artifact(model, cfg, data, metrics, ev, Path(model_dir), device)
    return metrics


def _fingerprint(tensors: list[Any]) -> Any:
    """An exact int64 checksum of the tensors' bits: any one changed element changes it."""
    import torch

    total = torch.zeros((), dtype=torch.int64, device=tensors[0].device)
    for t in tensors:
        flat = t.detach().reshape(-1)
        bits = flat.view(torch.int32 if flat.element_size() == 4 else torch.int64).to(torch.int64)
        odd = torch.arange(len(bits), device=bits.device, dtype=torch.int64).mul_(2).add_(1)
        total += (bits * odd).sum()  # int64 arithmetic wraps: fine for a checksum
    return total


def _fingerprints(tensors: list[Any]) -> list[int]:
    import torch
    import torch.distributed as dist

    mine = _fingerprint(tensors).reshape(1)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [int(g) for g in gathered]


def _check_same_everywhere(what: str, tensors: list[Any]) -> None:
    prints = _fingerprints(tensors)
    if len(set(prints)) > 1:
        raise DataError(
            f"the {what} differ between ranks: every rank must read the same "
            "prepared data (on SageMaker: S3DataDistributionType FullyReplicated)"
        )


def _save_replica(model: Any, step: FusedStep, replica_dir: Path, rank: int) -> None:
    from safetensors.torch import save_file

    replica_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, s in enumerate(step.emb_state + step.dense_state):
        tensors[f"state.{i}"] = s.detach().cpu().contiguous()
    save_file(tensors, str(replica_dir / f"replica-{rank}.safetensors"))


# ---------------------------------------------------------------------------- the step


class ShardedStep(FusedStep):
    """FusedStep on this rank's slice of a global batch, with one all-reduce per step.

    Called with the *global* batch (every rank has it: same permutation), it slices its rows,
    runs FusedStep's forward/backward on them, and replaces FusedStep's updates with: scatter
    into [dense | user rows | item rows] of the global batch's unique rows, all-reduce, apply.
    """

    def __init__(self, model: Any, cfg: TrainConfig, generator: Any, rank: int, world: int) -> None:
        super().__init__(model, cfg, generator)
        self.rank, self.world = rank, world
        self._lazy_momentum = cfg.opt == "sgd" and bool(cfg.momentum)

    def __call__(self, users: Any, items: Any, labels: Any, negatives: Any = None) -> Any:
        import torch

        batch = len(users)
        lo, hi = batch * self.rank // self.world, batch * (self.rank + 1) // self.world
        n = hi - lo
        all_items = items if negatives is None else torch.cat([items, negatives])
        self._union = [torch.unique(ids, return_inverse=True) for ids in (users, all_items)]
        user_pos = self._union[0][1][lo:hi]
        item_pos = self._union[1][1][lo:hi]
        mask_plan = [(batch, [(lo, n)]), (batch, [(lo, n)])]
        if negatives is not None:
            item_pos = torch.cat([item_pos, self._union[1][1][batch + lo : batch + hi]])
            mask_plan[1] = (2 * batch, [(lo, n), (batch + lo, n)])
        self._positions, self._mask_plan = [user_pos, item_pos], mask_plan
        self._share = n / batch  # FusedStep averages over this rank's n rows
        if self._lazy_momentum:  # every touched row, the same way on every rank
            for table, (rows, _) in enumerate(self._union):
                self._catch_up(table, rows, self.steps - self.last[table].index_select(0, rows))
        self._pending: list[Any] = []
        loss = super().__call__(
            users[lo:hi],
            items[lo:hi],
            labels[lo:hi],
            None if negatives is None else negatives[lo:hi],
        )
        if self._lazy_momentum:  # the rows other ranks touched moved at this step too
            for table, (rows, _) in enumerate(self._union):
                self.last[table].index_fill_(0, rows, self.steps)
        return loss * self._share if n else torch.zeros((), device=labels.device)

    def _mask(self, h: Any) -> Any:
        """Draw the dropout bytes of the whole global tower (one process's stream), keep ours."""
        import torch

        total, segments = self._mask_plan.pop(0)
        active = h > 0
        if self.keep_bytes < 256:
            width = h.shape[1]
            words = torch.empty((total * width + 7) // 8, dtype=torch.int64, device=h.device)
            words.random_(-(2**63), None, generator=self.gen)
            draws = words.view(torch.uint8)[: total * width].view(total, width)
            mine = torch.cat([draws.narrow(0, start, length) for start, length in segments])
            active &= mine < self.keep_bytes
        return active.to(h.dtype).mul_(self.scale)

    def _update_dense(self, grads: list[Any]) -> None:
        self._pending = list(grads)  # applied with the rows, after the all-reduce

    def _update_rows(self, table: int, rows: Any, inverse: Any, grad: Any) -> None:
        import torch

        union = self._union[table][0]
        g = torch.zeros(len(union), grad.shape[1], device=grad.device, dtype=grad.dtype)
        self._pending.append(g.index_add_(0, self._positions[table], grad))
        if table == 1:
            self._all_reduce_and_apply()

    def _all_reduce_and_apply(self) -> None:
        import torch
        import torch.distributed as dist

        parts = self._pending
        flat = torch.cat([p.reshape(-1) for p in parts]).mul_(self._share)
        dist.all_reduce(flat)
        summed = [
            chunk.view_as(p)
            for chunk, p in zip(flat.split([p.numel() for p in parts]), parts, strict=True)
        ]
        super()._update_dense(summed[:4])
        for table in (0, 1):
            rows = self._union[table][0]
            everyone = torch.arange(len(rows), device=rows.device)
            super()._update_rows(table, rows, everyone, summed[4 + table])

    def resync_if_drifted(self) -> int:
        """Compare replicas (weights and optimiser state); if any differs, copy rank 0's.
        Returns 1 when it had to (never expected on CPU; possible with CUDA atomics)."""
        import torch.distributed as dist

        tensors = [self.wu, self.wi, *self.dense, *self.emb_state, *self.dense_state]
        if len(set(_fingerprints(tensors))) == 1:
            return 0
        log.warning("replicas drifted apart; copying rank 0's weights and optimiser state")
        for t in tensors:
            dist.broadcast(t, src=0)
        return 1
