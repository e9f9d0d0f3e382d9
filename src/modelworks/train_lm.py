"""Ray Train for a causal language model: training by optimizer steps, as small GPT scripts do.

Every rank holds the whole training text as token ids (from the object store: a megabyte, not a
pipeline) and draws ``batch_size / workers`` random windows of ``model.max_len`` tokens per step from its
own seeded generator. Every ``train.eval_every`` steps the ranks evaluate on the same fixed validation
windows (``train.eval_batches`` of them), report, and rank 0 writes ``checkpoint_step=N``; a run that is
killed resumes from the last such checkpoint (optimizer, schedule and step counter included) and never
repeats a finished step. The step math is ``text_steps.train_step`` (plain PyTorch); lines marked
``# Ray`` are the only Ray calls.

Learning rate: linear warm-up over ``train.warmup_ratio`` of the steps, then constant or (``lr_schedule=
"cosine"``) a cosine down to ``train.min_lr`` at the last step; AdamW with ``train.beta2`` and
``train.weight_decay`` on weight matrices only, gradient clipping at ``train.grad_clip``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch  # prepare_model, get_device
import torch

from modelworks import checkpoint, text_steps
from modelworks.config import WorkflowConfig
from modelworks.console import Console, epoch_line
from modelworks.data import preprocess
from modelworks.data.chars import CharPreprocessor
from modelworks.data.corpus import windows
from modelworks.models import build_model
from modelworks.progress import FollowProgress, WorkerProgress
from modelworks.train import all_reduce, report_epoch, resume_epoch, run_trainer

# The validation windows of an evaluation come from this random seed, so every evaluation (and every rank count)
# measures the same text and the loss curve compares like with like.
_VAL_WINDOWS_SEED = 4242


def lm_model_spec(cfg: WorkflowConfig, pre: CharPreprocessor) -> dict:
    m = cfg.model
    return {"name": "transformer", "head": "lm", "vocab_size": pre.vocab_size, "max_len": m.max_len,
            "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
            "dropout": m.dropout, "pad_id": None, "use_sdpa": m.use_sdpa, "num_classes": 0,
            "task": "language_model"}


def total_steps(cfg: WorkflowConfig, train_tokens: int) -> int:
    """train.max_steps, or ``epochs`` passes over the training tokens."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return cfg.train.epochs * max(1, math.ceil(train_tokens / (cfg.train.batch_size * cfg.model.max_len)))


def validation_starts(n_tokens: int, context: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_VAL_WINDOWS_SEED)
    return torch.randint(n_tokens - context - 1, (count,), generator=generator)


@torch.no_grad()
def evaluate_windows(model, ids: torch.Tensor, starts: torch.Tensor, context: int, batch_size: int,
                     device: torch.device) -> dict:
    """Summed next-token loss, correct predictions and count over the windows at ``starts``."""
    total = {"loss_sum": 0.0, "correct": 0, "count": 0}
    for chunk in starts.split(batch_size):
        x, y = windows(ids, chunk, context)
        for k, v in text_steps.eval_step(model, {"ids": x.to(device), "labels": y.to(device)}, device).items():
            total[k] += v
    return total


def make_optimizer(model: torch.nn.Module, cfg: WorkflowConfig) -> torch.optim.Optimizer:
    """AdamW, decaying weight matrices only; fused (one kernel over all parameters, not a loop over them):
    ~10 % of a step of the small CPU model, whose step is dominated by per-tensor overheads."""
    hp = cfg.train
    return torch.optim.AdamW(text_steps.param_groups(model, hp.weight_decay), lr=hp.lr, betas=(0.9, hp.beta2),
                             fused=True)


def lm_train_loop(loop_cfg: dict) -> None:
    cfg = WorkflowConfig.model_validate(loop_cfg["config"])
    spec, hp, context = loop_cfg["spec"], cfg.train, cfg.model.max_len
    pre = preprocess.from_json(loop_cfg["preprocessor"])
    torch.set_num_threads(loop_cfg["threads"])
    ctx = ray.train.get_context()  # Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if hp.use_gpu else torch.device("cpu")  # Ray
    train_ids = torch.from_numpy(ray.get(loop_cfg["arrays"]["train"])["ids"].astype(np.int64))  # Ray
    val_ids = torch.from_numpy(ray.get(loop_cfg["arrays"]["val"])["ids"].astype(np.int64))  # Ray
    steps = total_steps(cfg, len(train_ids))
    local_bs = max(1, hp.batch_size // world)  # the configured batch is global
    val_starts = validation_starts(len(val_ids), context, hp.eval_batches * hp.batch_size)[rank::world]

    torch.manual_seed(hp.random_seed)  # identical initial weights on every rank
    model = build_model(spec)
    optimizer = make_optimizer(model, cfg)
    warmup = int(hp.warmup_ratio * steps)
    cosine = hp.lr_schedule == "cosine"
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: text_steps.warmup_cosine(
        s, warmup, steps, hp.min_lr / hp.lr) if cosine else min(1.0, (s + 1) / warmup) if warmup else 1.0)
    start, history = 0, []
    resume = ray.train.get_checkpoint()  # Ray
    if resume:
        with resume.as_directory() as d:
            loaded = checkpoint.load(d)
            model.load_state_dict(loaded.model.state_dict())
            state = checkpoint.load_train_state(d)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start, history = loaded.metrics["step"], loaded.metrics.get("history", [])
    model = ray.train.torch.prepare_model(model)  # Ray: DDP when world > 1

    # Progress speaks in evaluation intervals ("rounds" of eval_every steps), which the console shows as
    # step counts; a resumed run starts at the round after its checkpoint.
    rounds = math.ceil(steps / hp.eval_every)
    progress = WorkerProgress(loop_cfg.get("progress"), rank, "train")
    progress.start(rounds, start // hp.eval_every + 1, hp.eval_every, unit="tokens", steps=steps)
    step = start
    while step < steps:
        round_no = step // hp.eval_every + 1
        end = min(steps, round_no * hp.eval_every)
        # Each round's windows come from its own random seed: a resumed run draws what the killed one would have.
        gen = torch.Generator().manual_seed(hp.random_seed * 100_003 + round_no * 1009 + rank)
        t0 = time.perf_counter()
        loss_sum = count = 0.0
        for i in range(end - step):
            x, y = windows(train_ids, torch.randint(len(train_ids) - context - 1, (local_bs,), generator=gen), context)
            out = text_steps.train_step(model, optimizer, [{"ids": x.to(device), "labels": y.to(device)}],
                                        scheduler=scheduler, max_grad_norm=hp.grad_clip, device=device)
            loss_sum += out["loss"] * out["targets"]
            count += out["targets"]
            progress.batch(round_no, i + 1, count * world / (time.perf_counter() - t0), loss_sum / count)
        train_time = time.perf_counter() - t0
        step = end
        val = evaluate_windows(model, val_ids, val_starts, context, local_bs * 4, device)
        loss_sum, count, v_loss, v_correct, v_count = all_reduce(
            [loss_sum, count, val["loss_sum"], val["correct"], val["count"]])
        metrics = {
            "epoch": round_no,  # the evaluation round: what the console and the checkpoint manager count
            "step": step,
            "train_loss": loss_sum / max(count, 1),
            "val_loss": v_loss / max(v_count, 1),
            "val_perplexity": math.exp(min(v_loss / max(v_count, 1), 50.0)),
            "val_accuracy": v_correct / max(v_count, 1),  # next-token accuracy
            "tokens_per_s": count / max(train_time, 1e-9),  # all ranks' training tokens per second
            "lr": optimizer.param_groups[0]["lr"],
        }
        report_epoch(metrics, history=history, rank=rank,
                     log_line=epoch_line('', metrics, rounds, 'tokens', steps), model=model, spec=spec, pre=pre,
                     cfg=cfg, train_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                           "step": step},
                     dir_name=f"checkpoint_step={step}")


def fit_lm(cfg: WorkflowConfig, train_ids: np.ndarray, val_ids: np.ndarray, pre: CharPreprocessor, spec: dict,
           runs_root: Path, run_name: str, log=print) -> Path:
    """Train (or resume) the language model; returns the run directory holding ``checkpoint_step=N``."""
    console = Console.from_log(log)
    run_dir = runs_root / run_name
    steps = total_steps(cfg, len(train_ids))
    last = resume_epoch(run_dir)
    if last:
        if last >= steps:
            console(f"      all {steps} steps of run {run_name} already done; skipping training")
            return run_dir
        console(f"      resuming run {run_name} from checkpoint_step={last} (steps 1-{last} are done)")
    with console.training("", cfg.train.max_failures + 1) as on_event, FollowProgress(on_event) as board:
        run_trainer(lm_train_loop, {"config": cfg.model_dump(mode="json"), "preprocessor": pre.to_json(),
                                    "spec": spec},
                    {"train": {"ids": train_ids}, "val": {"ids": val_ids}}, cfg, runs_root, run_name, progress=board)
    return run_dir
