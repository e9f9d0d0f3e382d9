"""The Transformer's training math as plain PyTorch functions: no Ray here, so they are unit-tested
directly and run as they are on a GPU machine (bench/gpu_check.py).

- ``param_groups``: AdamW's weight decay on weight matrices only; none on biases, LayerNorm, embeddings.
- ``warmup_cosine``: learning-rate factor per optimizer step: linear warm-up, then cosine decay to a floor.
- ``train_step``: one optimizer step over one or more micro-batches (gradient accumulation), with
  gradient clipping and bf16 autocast on CUDA (fp32 on CPU, where bf16 matmuls are slower).
- ``eval_step``: loss sum, correct count and count for one batch, without gradients.
- ``make_batch``: a batch from in-memory rows (ids cut to the batch's longest row; masked for the masked LM).
- ``evaluate_rows``: summed ``eval_step`` over all rows, in length-sorted batches with fixed masks.

Rows are ``{"ids": int32 (N, max_len) right-padded, "length": (N,)[, "y": (N,)]}`` (data.text's layout).
A batch is ``{"ids": LongTensor (B, T)}`` plus ``"y"`` (classification, (B,)) or ``"labels"`` (masked
LM, (B, T) with IGNORE_INDEX at unmasked positions).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelworks.data.text import PAD_ID, mask_tokens, trim
from modelworks.models.transformer import IGNORE_INDEX


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only the matrices of Linear layers: decaying norms, biases or embeddings pulls them towards 0
    for no gain in generalisation (BERT, GPT-2 and nanoGPT all exclude them)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): 0 -> 1 linearly over warm-up, then a cosine
    from 1 down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(device: torch.device):
    """bf16 on CUDA (tensor cores, no loss scaling needed); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_of(model: nn.Module, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, predictions, targets) for a classification or a masked-LM batch."""
    if "labels" in batch:  # masked LM: the model scores only the masked positions
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        logits = model(batch["ids"], batch["labels"])
    else:
        targets = batch["y"]
        logits = model(batch["ids"])
    if targets.numel() == 0:
        # A masked-LM batch of very short texts can draw no token to mask (32 one-token phrases: 0.85^32, once
        # in ~180 batches). The mean over nothing is NaN and would poison the epoch's summed loss; a zero that
        # stays in the graph keeps DDP's backward (and its all-reduce) the same on every rank.
        return logits.float().sum() * 0.0, logits.argmax(-1), targets
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    return loss, logits.argmax(-1), targets


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict], *,
               scheduler=None, max_grad_norm: float | None = 1.0, label_smoothing: float = 0.0,
               device: torch.device = torch.device("cpu")) -> dict:
    """One optimizer step. Gradients of the micro-batches add up (each scaled by 1/len), so k micro-batches
    of b rows train like one batch of k*b (exactly for classification; for masked LM each micro-batch's
    mean over its own masked tokens weighs the same). Under DDP only the last micro-batch synchronises.
    Returns {"loss": mean loss, "targets": count, "tokens": real tokens seen}."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, targets, tokens = 0.0, 0, 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, autocast(device):
            loss, _, tgt = loss_of(model, batch, label_smoothing)
            (loss / len(micro_batches)).backward()
        total += loss.item()
        targets += len(tgt)
        tokens += int((batch["ids"] != PAD_ID).sum())
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {"loss": total / len(micro_batches), "targets": targets, "tokens": tokens}


@torch.no_grad()
def eval_step(model: nn.Module, batch: dict, device: torch.device = torch.device("cpu")) -> dict:
    """Summed loss, correct predictions and count for one batch (sums, so ranks and batches add up)."""
    model.eval()
    with autocast(device):
        loss, pred, targets = loss_of(model, batch)
    return {"loss_sum": float(loss) * len(targets), "correct": int((pred == targets).sum()), "count": len(targets)}


# Rows per evaluation batch: sorted by length, so a batch holds little padding.
EVAL_BATCH = 256
# Masks for the masked LM's validation batches come from fixed seeds, so the validation loss of different
# epochs is measured on the same corruption and the curve compares like with like.
VAL_MASK_SEED = 12345


def make_batch(rows: dict[str, np.ndarray], idx: np.ndarray, task: str, vocab_size: int, mask_prob: float,
               generator: torch.Generator, device: torch.device, word_start: torch.Tensor | None = None) -> dict:
    """Rows ``idx`` as a batch on ``device``: ids cut to the batch's longest row; for ``task="mlm"`` corrupted
    on the CPU (data.text.mask_tokens; whole words with a ``word_start`` table) with ``labels``, else with the
    class labels ``y``."""
    ids = torch.from_numpy(trim(rows["ids"][idx], rows["length"][idx])).long()
    if task == "mlm":
        ids, labels = mask_tokens(ids, vocab_size, generator, mask_prob, word_start)
        return {"ids": ids.to(device), "labels": labels.to(device)}
    return {"ids": ids.to(device), "y": torch.from_numpy(rows["y"][idx]).long().to(device)}


def evaluate_rows(model: nn.Module, rows: dict[str, np.ndarray], task: str, vocab_size: int, mask_prob: float,
                  device: torch.device = torch.device("cpu"), batch_size: int = EVAL_BATCH,
                  word_start: torch.Tensor | None = None) -> dict:
    """Summed loss, correct and count over all rows (sums: ranks add them up)."""
    total = {"loss_sum": 0.0, "correct": 0, "count": 0}
    order = np.argsort(rows["length"], kind="stable")
    for i in range(0, len(order), batch_size):
        gen = torch.Generator().manual_seed(VAL_MASK_SEED + i)
        batch = make_batch(rows, order[i:i + batch_size], task, vocab_size, mask_prob, gen, device, word_start)
        for k, v in eval_step(model, batch, device).items():
            total[k] += v
    return total
