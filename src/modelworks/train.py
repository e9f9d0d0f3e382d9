"""Ray Train: the per-worker training loop and the TorchTrainer driver.

Per epoch every rank trains on its shard, validates, and calls ``ray.train.report`` (a barrier); rank 0
writes the checkpoint directory ``checkpoint_epoch=N``. Rerunning with the same run name resumes from
the last checkpoint (Train V2 restores the run from its storage folder).
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch  # prepare_model, get_device
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from torch import nn

from modelworks import checkpoint, ray_private
from modelworks import storage as storage_mod
from modelworks.console import Console, epoch_line
from modelworks.config import WorkflowConfig
from modelworks.data import preprocess
from modelworks.data.preprocess import Preprocessor
from modelworks.errors import UserError
from modelworks.models import build_model
from modelworks.progress import EpochRecorded, FollowProgress, WorkerProgress
from modelworks.runtime import ray_is_local, train_poll_interval

# checkpoint_epoch=N (epochs) or checkpoint_step=N (language models, which train by steps)
CKPT_RE = re.compile(r"^checkpoint_(?:epoch|step)=(\d+)$")
# The controller's poll for the MLP trainer (runtime.train_poll_interval): its epochs last 0.01-3 s, and at 0.2 s
# each digits epoch (~0.03 s of work) waited ~0.18 s for the poll, 3.6 s of a 20-epoch run. Text and language
# models keep 0.2 s: their reports are tens of seconds apart, and each poll takes CPU from the 2 compute threads.
MLP_POLL_S = 0.05
# Logical CPUs kept free for Ray Data's read/map tasks (each asks for 1 CPU): without them, training
# workers holding every CPU wait forever for their own input (seen on 2 cores, see ray-notes.md).
DATA_CPUS = 1.0


# ------------------------------------------------------------------------------------------- helpers
def model_spec(cfg: WorkflowConfig, pre: Preprocessor) -> dict:
    return {"name": cfg.model.name, "input_dim": pre.input_dim, "num_classes": pre.num_classes,
            **cfg.model.model_dump(exclude={"name"})}


def make_loss(cfg: WorkflowConfig) -> nn.Module:
    """Cross-entropy for classification; MSE (the default) or Huber for regression, on the standardised label."""
    if cfg.model.task == "regression":
        return nn.HuberLoss() if cfg.train.loss == "huber" else nn.MSELoss()
    return nn.CrossEntropyLoss()


def forward(model: nn.Module, xb: torch.Tensor, regression: bool) -> torch.Tensor:
    """Logits (B, C), or for regression the (B,) prediction of the standardised label."""
    out = model(xb)
    return out[:, 0] if regression else out


def make_optimizer(cfg: WorkflowConfig, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_at(cfg: WorkflowConfig, epoch: int) -> float:
    """Learning rate for a 1-based epoch: constant, or cosine decay from lr towards 0 over the run."""
    if cfg.train.lr_schedule == "constant":
        return cfg.train.lr
    return cfg.train.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.train.epochs))


def all_reduce(values: list[float], op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def worker_group(rank: int) -> dict:
    """Who trained: the world size Ray Train gave this run and each rank's pid, host and Ray node, gathered
    from every rank (a collective: every rank calls it at the same point of the loop). Recorded in each
    checkpoint's metrics.json as ``workers``, so a run shows the DDP group it really had - a 2-worker run that
    silently trained on one process would show one rank."""
    me = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
          "node_id": ray.get_runtime_context().get_node_id()}  # Ray
    ranks = [me]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, me)
    return {"world_size": ray.train.get_context().get_world_size(),  # Ray
            "ranks": sorted(ranks, key=lambda r: r["rank"])}


def report_epoch(metrics: dict, *, history: list[dict], rank: int, log_line: str,
                 model: nn.Module, spec: dict, pre, cfg: WorkflowConfig, train_state: dict, dir_name: str,
                 saved_metrics: dict | None = None) -> None:
    """The end of an epoch (or of an evaluation round), the same for every training loop: record ``metrics``
    in ``history``, print ``log_line`` to the worker's log, and on rank 0 save the checkpoint (``saved_metrics``
    are extra fields for its metrics.json, plus ``workers``: ``worker_group``) that ``ray.train.report`` (a
    barrier for all ranks) files as ``dir_name``."""
    workers = worker_group(rank)
    history.append(metrics)  # the console's epoch line comes from the controller (progress.EpochRecorded)
    if rank == 0:  # the worker's log (runs/<run>/logs with the CLI); the console prints its own copy
        print(f"[modelworks] {log_line.strip()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            inner = model.module if hasattr(model, "module") else model
            checkpoint.save(tmp, model=inner, spec=spec, preprocessor=pre,
                            metrics={**metrics, "history": history, "workers": workers, **(saved_metrics or {})},
                            config=cfg.model_dump(mode="json"), train_state=train_state)
            ckpt = ray.train.Checkpoint.from_directory(tmp)  # Ray
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=dir_name)  # Ray


def _collect(shard, device, dtypes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Read this worker's shard once through Ray Data into tensors (the shard, never the whole dataset)."""
    xs, ys = [], []
    for batch in shard.iter_torch_batches(batch_size=8192, dtypes=dtypes):
        xs.append(batch["x"])
        ys.append(batch["y"])
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


def _take_rows(arrays: dict, rank: int, world: int, device, dtypes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.as_tensor(arrays[k][rank::world], dtype=dtypes[k]).to(device) for k in ("x", "y"))


@torch.no_grad()
def _evaluate(model: nn.Module, batches, loss_fn, regression: bool = False) -> list[float]:
    """Sums over this rank's validation batches, to be all-reduced: [loss, correct, count] for classification,
    [loss, count, squared error, absolute error, sum y, sum y^2] for regression (standardised units)."""
    model.eval()
    sums = [0.0] * (6 if regression else 3)
    for xb, yb in batches:
        out = forward(model, xb, regression)
        sums[0] += float(loss_fn(out, yb)) * len(yb)
        if regression:
            err = out - yb
            for i, v in enumerate((len(yb), (err * err).sum(), err.abs().sum(), yb.sum(), (yb * yb).sum()), 1):
                sums[i] += float(v)
        else:
            sums[1] += float((out.argmax(1) == yb).sum())
            sums[2] += len(yb)
    return sums


def val_metrics(sums: list[float], regression: bool, target_scale: float = 1.0) -> dict:
    """Validation metrics from the all-reduced sums of ``_evaluate``. Regression errors are reported in the
    label's units; R² is the same in either."""
    if not regression:
        loss_sum, correct, count = sums
        return {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(count, 1)}
    loss_sum, n, sse, abs_sum, y_sum, y2_sum = sums
    n = max(n, 1)
    total = y2_sum - y_sum * y_sum / n  # sum of squares around the mean
    return {"val_loss": loss_sum / n, "val_r2": 1.0 - sse / total if total > 0 else 0.0,
            "val_mae": abs_sum / n * target_scale, "val_rmse": math.sqrt(sse / n) * target_scale}


# --------------------------------------------------------------------------------------- worker loop
def train_loop(loop_cfg: dict) -> None:
    cfg = WorkflowConfig.model_validate(loop_cfg["config"])
    pre = preprocess.from_json(loop_cfg["preprocessor"])  # image or table preprocessor
    torch.set_num_threads(loop_cfg["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.train.random_seed)  # identical initial weights on every rank

    spec = model_spec(cfg, pre)
    model = build_model(spec)
    optimizer = make_optimizer(cfg, model.parameters())
    start_epoch, history = 1, []
    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as d:
            loaded = checkpoint.load(d)
            model.load_state_dict(loaded.model.state_dict())
            state = checkpoint.load_train_state(d)
            if state:
                optimizer.load_state_dict(state["optimizer"])
            start_epoch = loaded.metrics["epoch"] + 1
            history = loaded.metrics.get("history", [])
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU) when world > 1
    regression = cfg.model.task == "regression"
    loss_fn = make_loss(cfg)
    local_bs = max(1, cfg.train.batch_size // world)  # the configured batch is global, as in the seed
    dtypes = {"x": torch.float32, "y": torch.float32 if regression else torch.int64}

    cached = None
    if "arrays" in loop_cfg:  # small data, already in the object store: this rank's every world-th row
        cached = tuple(_take_rows(ray.get(loop_cfg["arrays"][s]), rank, world, device, dtypes)  # Ray
                       for s in ("train", "val"))
    else:
        train_shard = ray.train.get_dataset_shard("train")
        val_shard = ray.train.get_dataset_shard("val")
        if cfg.data.cache_on_worker:
            cached = _collect(train_shard, device, dtypes), _collect(val_shard, device, dtypes)
    if cached:
        # Every rank must take the same number of steps, or DDP's all-reduce waits forever.
        steps = int(all_reduce([len(cached[0][0]) // local_bs], dist.ReduceOp.MIN if world > 1 else None)[0])
    progress = WorkerProgress(loop_cfg.get("progress"), rank, "train")
    progress.start(cfg.train.epochs, start_epoch, steps if cached else None)

    for epoch in range(start_epoch, cfg.train.epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum = seen = 0.0
        if cached:
            (x_all, y_all), _ = cached
            gen = torch.Generator().manual_seed(cfg.train.random_seed * 100_003 + epoch * 1009 + rank)
            perm = torch.randperm(len(x_all), generator=gen).to(device)
            batches = ((x_all[i], y_all[i]) for i in perm[: steps * local_bs].split(local_bs))
        else:
            batches = ((b["x"], b["y"]) for b in train_shard.iter_torch_batches(
                batch_size=local_bs, drop_last=True, dtypes=dtypes, device=device))
        for i, (xb, yb) in enumerate(batches, start=1):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(forward(model, xb, regression), yb)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(yb)
            seen += len(yb)
            progress.batch(epoch, i, seen * world / (time.perf_counter() - t0), loss_sum / seen)
        train_time = time.perf_counter() - t0
        if cached:
            xv, yv = cached[1]
            val_batches = zip(xv.split(4096), yv.split(4096))
        else:
            val_batches = ((b["x"], b["y"]) for b in val_shard.iter_torch_batches(
                batch_size=4096, dtypes=dtypes, device=device))
        loss_sum, seen, *v_sums = all_reduce([loss_sum, seen, *_evaluate(model, val_batches, loss_fn, regression)])
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            **val_metrics(v_sums, regression, getattr(pre, "target_scale", 1.0)),
            "train_samples": int(seen),
            "samples_per_s": seen / max(train_time, 1e-9),  # all ranks' samples per second
            "lr": lr_at(cfg, epoch),
        }
        report_epoch(metrics, history=history, rank=rank,
                     log_line=epoch_line('', metrics, cfg.train.epochs, 'samples'), model=model, spec=spec, pre=pre,
                     cfg=cfg, train_state={"optimizer": optimizer.state_dict(), "epoch": epoch},
                     dir_name=f"checkpoint_epoch={epoch}")


# -------------------------------------------------------------------------------------------- driver
@dataclass
class CpuPlan:
    cpus_per_worker: float
    threads: int


def plan_cpus(workers: int, use_gpu: bool, data_cpus: float = DATA_CPUS) -> CpuPlan:
    """Give the workers what is left after ``data_cpus`` (DATA_CPUS while training reads through Ray Data,
    0 when the data travels through the object store); fail at once when that cannot fit."""
    resources = ray.cluster_resources()
    if use_gpu and resources.get("GPU", 0) < workers:
        raise UserError(f"--gpu asks for {workers} GPU worker(s) but the Ray cluster has "
                        f"{resources.get('GPU', 0):g} GPU(s); drop --gpu or add GPU nodes")
    total = resources.get("CPU", 0.0)
    free_for_workers = total - data_cpus
    if free_for_workers <= 0:
        raise UserError(f"the Ray cluster has {total:g} CPUs; training needs more than {data_cpus:g} "
                        f"(kept for Ray Data): start Ray with more CPUs")
    per_worker = min(1.0, free_for_workers / workers)
    asked = os.environ.get("MODELWORKS_CPUS_PER_WORKER")  # a cluster profile's cpus_per_worker
    if asked:
        per_worker = float(asked)
        if per_worker * workers > free_for_workers + 1e-9:
            raise UserError(f"{workers} worker(s) x {per_worker:g} CPUs (the profile's cpus_per_worker) do not fit on "
                            f"{total:g} CPUs with {data_cpus:g} kept for data; lower cpus_per_worker or workers")
    if per_worker < 0.1:
        raise UserError(f"{workers} workers do not fit on {total:g} CPUs with {data_cpus:g} kept for data; "
                        f"use --workers {int(free_for_workers / 0.1)} or fewer")
    physical = os.cpu_count() or 1
    threads = max(1, physical // workers) if ray_is_local() else max(1, int(per_worker))
    return CpuPlan(per_worker, threads)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, by epoch or step (a directory without valid sums is skipped)."""
    found = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m and (p / checkpoint.SUMS).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resume_epoch(run_dir: Path) -> int:
    """The epoch (or step) Train V2 will resume after: its snapshot's latest checkpoint (0 when starting fresh).
    With object storage, the run folder's copy is brought level with it first (storage.pull)."""
    storage_mod.pull(run_dir)
    m = CKPT_RE.match(ray_private.latest_train_checkpoint(run_dir) or "")
    return int(m.group(1)) if m else 0


def best_checkpoint(run_dir: Path, metric: str = "val_accuracy") -> Path:
    """The checkpoint with the best validation ``metric`` (lowest for val_loss, else highest); ties go to
    the lower validation loss, then the earlier epoch."""
    scored = []
    for epoch, path in list_checkpoints(run_dir):
        m = json.loads((path / "metrics.json").read_text())
        primary = -m[metric] if metric == "val_loss" else m[metric]
        scored.append((primary, -m["val_loss"], -epoch, path))
    if not scored:
        raise UserError(f"run {run_dir} has no checkpoint; train it first")
    return max(scored)[-1]


def fit(cfg: WorkflowConfig, datasets: dict[str, ray.data.Dataset], pre: Preprocessor, runs_root: Path,
        run_name: str, log=print) -> Path:
    """Train (or resume) the run; returns the run directory holding its checkpoints."""
    console = Console.from_log(log)
    run_dir = runs_root / run_name
    last = resume_epoch(run_dir)
    if last:
        if last >= cfg.train.epochs:
            console(f"      all {cfg.train.epochs} epochs of run {run_name} already done; skipping training")
            return run_dir
        console(f"      resuming run {run_name} from checkpoint_epoch={last} (epochs 1-{last} are done)")
    with console.training("", cfg.train.max_failures + 1) as on_event, FollowProgress(on_event) as board:
        run_trainer(train_loop, {"config": cfg.model_dump(mode="json"), "preprocessor": pre.to_json()}, datasets,
                    cfg, runs_root, run_name, progress=board, poll_s=MLP_POLL_S)
    return run_dir


def checkpoints_kept(cfg: WorkflowConfig) -> CheckpointConfig:
    """train.keep_checkpoints: Ray Train keeps the ``num_to_keep`` best checkpoints by the score, and always the
    newest one besides (the one a rerun resumes from); it deletes the others as training goes."""
    if cfg.train.keep_checkpoints is None:
        return CheckpointConfig(num_to_keep=None)
    metric = cfg.evaluate.metric
    return CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=metric,
                            checkpoint_score_order="min" if metric == "val_loss" else "max")


def run_trainer(loop, loop_config: dict, datasets: dict, cfg: WorkflowConfig, storage: Path, name: str,
                progress=None, poll_s: float | None = None) -> None:
    """One TorchTrainer run of ``loop`` on train/val, with the CPU plan's threads, checkpoints kept, and
    the workflow's failure policy; rerunning the same storage/name resumes it. ``datasets``: Ray Datasets,
    or for data that fits in memory ``{"x", "y"}`` arrays per split, which the workers read from the object
    store (no Ray Data pipeline: its coordinator actors cost seconds to start). ``progress``: a
    ``progress.ProgressBoard`` rank 0 reports to; ``poll_s``: the controller's poll (runtime.train_poll_interval)."""
    in_memory = isinstance(datasets["train"], dict)  # arrays that fit in memory: the object store, not Ray Data
    plan = plan_cpus(cfg.train.workers, cfg.train.use_gpu, data_cpus=0.0 if in_memory else DATA_CPUS)
    loop_config = {**loop_config, "threads": plan.threads, "progress": progress}
    if in_memory:
        loop_config["arrays"] = {s: ray.put(datasets[s]) for s in ("train", "val")}  # Ray
        datasets = None
    else:
        datasets = {"train": datasets["train"], "val": datasets["val"]}
    trainer = ray_private.torch_trainer_class()(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=storage_mod.train_storage(storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=checkpoints_kept(cfg),
            callbacks=[EpochRecorded(progress)] if progress is not None else None,
        ),
    )
    with train_poll_interval(poll_s):
        trainer.fit()
    storage_mod.pull(storage / name)  # object storage: evaluate and register read the run folder's copy
