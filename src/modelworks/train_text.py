"""Ray Train for the Transformer: one worker loop for both text tasks, and its TorchTrainer driver.

- ``task="mlm"``: the pre-training step (masked-language modelling on the training sentences and any
  extra corpus); settings from ``cfg.pretrain``.
- ``task="classify"``: the fine-tuning step (a label per sentence); settings from ``cfg.train``. Its
  encoder starts from a pre-trained checkpoint when one is given (``init_encoder``), else from scratch.

The math of a step lives in ``text_steps`` (plain PyTorch); the lines marked ``# Ray`` are the only Ray
calls. Each worker reads its shard of token ids once through Ray Data, keeps it in memory, and every
epoch draws length-bucketed batches padded to their own longest row. Checkpoints are
``checkpoint_epoch=N`` as for images; rerunning the same run resumes from the last one.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch  # prepare_model, get_device
import torch
import torch.distributed as dist

from modelworks import checkpoint, text_steps
from modelworks.config import WorkflowConfig
from modelworks.console import Console, epoch_line
from modelworks.data import preprocess
from modelworks.data.text import TextPreprocessor, content_order, length_bucketed_batches, word_starts
from modelworks.models import build_model
from modelworks.progress import FollowProgress, WorkerProgress
from modelworks.train import all_reduce, report_epoch, resume_epoch, run_trainer

TASKS = ("mlm", "classify")


def text_model_spec(cfg: WorkflowConfig, pre: TextPreprocessor, task: str) -> dict:
    m = cfg.model
    return {"name": "transformer", "head": task, "vocab_size": pre.vocab_size, "max_len": pre.max_len,
            "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
            "dropout": cfg.pretrain.dropout if task == "mlm" else m.dropout, "pad_id": 0, "pooling": m.pooling, "use_sdpa": m.use_sdpa,
            "num_classes": pre.num_classes}


def _collect(shard) -> dict[str, np.ndarray]:
    """A worker's shard (or on the driver, a whole split) as arrays (ids, length[, y]): read once, reused
    every epoch."""
    parts: dict[str, list] = {}
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy"):  # Ray
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        return {"ids": np.zeros((0, 1), np.int32), "length": np.zeros(0, np.int32)}
    return content_order({k: np.concatenate(v) for k, v in parts.items()})  # the same batches in every run


def initial_model(spec: dict, random_seed: int, init_encoder: str | None = None) -> torch.nn.Module:
    """The model a text step starts from: fresh weights from ``random_seed`` (the same on every rank), the
    encoder then replaced by a pre-trained checkpoint's when one is given (loaded and checksum-verified).

    The checkpoint is read before the seed is set: building its model draws random initial weights, which
    would move every later draw from torch's global generator (the dropout masks). So a fine-tune and its
    from-scratch baseline with the same seed start the same head and draw the same dropout masks; only the
    encoder differs."""
    pretrained = checkpoint.load(init_encoder).model.encoder.state_dict() if init_encoder else None
    torch.manual_seed(random_seed)
    model = build_model(spec)
    if pretrained is not None:
        model.encoder.load_state_dict(pretrained)
    return model


def text_train_loop(loop_cfg: dict) -> None:
    cfg = WorkflowConfig.model_validate(loop_cfg["config"])
    task, spec = loop_cfg["task"], loop_cfg["spec"]
    hp = cfg.pretrain if task == "mlm" else cfg.train
    pre = preprocess.from_json(loop_cfg["preprocessor"])
    torch.set_num_threads(loop_cfg["threads"])
    ctx = ray.train.get_context()  # Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")  # Ray
    init_from = loop_cfg.get("init_encoder")
    model = initial_model(spec, cfg.train.random_seed, init_from)
    init_digest = checkpoint.state_digest(model.encoder) if hasattr(model, "encoder") else None

    if "arrays" in loop_cfg:  # read by the driver, in the object store: this rank's every world-th row
        train_rows, val_rows = ({k: v[rank::world] for k, v in ray.get(loop_cfg["arrays"][s]).items()}  # Ray
                                for s in ("train", "val"))
    else:
        train_rows, val_rows = _collect(ray.train.get_dataset_shard("train")), _collect(ray.train.get_dataset_shard("val"))  # Ray
    accum = max(1, hp.grad_accum)
    local_bs = max(1, hp.batch_size // (world * accum))  # the configured batch is global
    # Every rank must take the same number of steps, or DDP's all-reduce waits forever.
    steps = int(all_reduce([len(train_rows["length"]) // (local_bs * accum)],
                            dist.ReduceOp.MIN if world > 1 else None)[0])
    total_steps = max(1, steps * hp.epochs)
    warmup = int(hp.warmup_ratio * total_steps)
    min_ratio = hp.min_lr / hp.lr

    groups = text_steps.param_groups(model, hp.weight_decay)
    kind = getattr(hp, "optimizer", "adamw")  # pre-training always uses AdamW
    if kind == "sgd":
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9)
    else:
        adam = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        optimizer = adam(groups, lr=hp.lr, betas=(0.9, hp.beta2))
    # Warm-up applies to both schedules: Adam's early steps on a fresh head are what it protects against.
    schedule = (lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0) if hp.lr_schedule == "constant" else (
        lambda s: text_steps.warmup_cosine(s, warmup, total_steps, min_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    start_epoch, history = 1, []
    resume = ray.train.get_checkpoint()  # Ray
    if resume:
        with resume.as_directory() as d:
            loaded = checkpoint.load(d)
            model.load_state_dict(loaded.model.state_dict())
            state = checkpoint.load_train_state(d) or {}
            if "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            start_epoch = loaded.metrics["epoch"] + 1
            history = loaded.metrics.get("history", [])
            init_from, init_digest = loaded.metrics.get("init_from"), loaded.metrics.get("init_encoder_sha256")
    model = ray.train.torch.prepare_model(model)  # Ray: DDP (gloo on CPU, nccl on GPU) when world > 1

    mask_prob = cfg.pretrain.mask_prob
    word_start = word_starts(pre.tokenizer) if task == "mlm" and cfg.pretrain.whole_word else None
    progress = WorkerProgress(loop_cfg.get("progress"), rank, task)
    progress.start(hp.epochs, start_epoch, steps, unit="tokens")
    for epoch in range(start_epoch, hp.epochs + 1):
        epoch_seed = cfg.train.random_seed * 100_003 + epoch * 1009
        gen = torch.Generator().manual_seed(epoch_seed + rank)
        # Several ranks order their batches alike, so no rank waits at the all-reduce for a longer batch.
        same_order = torch.Generator().manual_seed(epoch_seed) if world > 1 else None
        batches = length_bucketed_batches(train_rows["length"], local_bs, gen, order_generator=same_order,
                                          n_batches=steps * accum)
        t0 = time.perf_counter()
        loss_sum = targets = tokens = 0.0
        for i in range(0, len(batches), accum):
            micro = [text_steps.make_batch(train_rows, idx, task, pre.vocab_size, mask_prob, gen, device, word_start)
                     for idx in batches[i:i + accum]]
            out = text_steps.train_step(model, optimizer, micro, scheduler=scheduler, max_grad_norm=hp.grad_clip,
                                        label_smoothing=getattr(hp, "label_smoothing", 0.0), device=device)
            loss_sum += out["loss"] * out["targets"]
            targets += out["targets"]
            tokens += out["tokens"]
            progress.batch(epoch, i // accum + 1, tokens * world / (time.perf_counter() - t0), loss_sum / max(targets, 1))
        train_time = time.perf_counter() - t0
        val = text_steps.evaluate_rows(model, val_rows, task, pre.vocab_size, mask_prob, device,
                                         word_start=word_start)
        loss_sum, targets, tokens, v_loss, v_correct, v_count = all_reduce(
            [loss_sum, targets, tokens, val["loss_sum"], val["correct"], val["count"]])
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(targets, 1),
            "val_loss": v_loss / max(v_count, 1),
            # classification: sentence accuracy; masked LM: accuracy at the masked positions
            "val_accuracy": v_correct / max(v_count, 1),
            "train_samples": int(steps * local_bs * accum * world),
            "samples_per_s": steps * local_bs * accum * world / max(train_time, 1e-9),
            "tokens_per_s": tokens / max(train_time, 1e-9),  # all ranks' real (non-padding) tokens per second
            "lr": optimizer.param_groups[0]["lr"],
        }
        report_epoch(metrics, history=history, rank=rank,
                     log_line=epoch_line(task, metrics, hp.epochs, 'tokens'), model=model, spec=spec, pre=pre, cfg=cfg,
                     train_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "epoch": epoch},
                     dir_name=f"checkpoint_epoch={epoch}",
                     saved_metrics={"task": task, "init_from": init_from, "init_encoder_sha256": init_digest})


def fit_text(cfg: WorkflowConfig, task: str, datasets: dict[str, ray.data.Dataset], pre: TextPreprocessor,
             spec: dict, storage: Path, name: str, *, init_encoder: str | None = None, log=print) -> Path:
    """Train (or resume) one text step; returns its directory ``storage/name`` holding the checkpoints."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    hp = cfg.pretrain if task == "mlm" else cfg.train
    step = "pretrain" if task == "mlm" else "train"
    console = Console.from_log(log)
    run_dir = storage / name
    last = resume_epoch(run_dir)
    if last:
        if last >= hp.epochs:
            console(f"      {step}: all {hp.epochs} epochs already done; skipping")
            return run_dir
        console(f"      resuming {step} from checkpoint_epoch={last} (epochs 1-{last} are done)")
    # Token ids are small (SST-2's whole training split: ~17 MB) and every worker holds its shard in memory
    # anyway: read them once here and hand them to the workers through the object store, as train.run_trainer
    # does for images. A Ray Data pipeline inside Ray Train costs seconds of coordinator start-up per run.
    datasets = {s: _collect(datasets[s]) if isinstance(datasets[s], ray.data.Dataset) else datasets[s]
                for s in ("train", "val")}
    with console.training(task, cfg.train.max_failures + 1) as on_event, FollowProgress(on_event) as board:
        run_trainer(text_train_loop, {"config": cfg.model_dump(mode="json"), "task": task,
                                      "preprocessor": pre.to_json(), "spec": spec, "init_encoder": init_encoder},
                    datasets, cfg, storage, name, progress=board)
    return run_dir
