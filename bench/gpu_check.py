"""Does the Transformer train on this machine's accelerator? Plain PyTorch, no Ray: the same model
(modelworks.models.transformer), the same step functions (modelworks.text_steps) and the same batching
(modelworks.data.text) that Ray Train runs, driven by a simple loop, so it runs on a GPU box where only
torch, numpy and tokenizers are installed.

    python bench/gpu_check.py                                   # auto device, MLM then classifier
    python bench/gpu_check.py --device cuda --d-model 512 --layers 8 --heads 8 --batch-size 256
    python bench/gpu_check.py --device cpu --d-model 64 --layers 2 --steps 100 --data synthetic

Data: SST-2's training sentences ($MODELWORKS_DATA_DIR/sst2/train.csv.gz, or --data-dir) when present,
else a synthetic corpus generated here with a learnable pattern (sentiment words decide the label; each
noun has its own verb, so masked words are predictable from context).

For each task (masked-LM pre-training and/or sentence classification) it trains --steps optimizer steps
with AdamW and a warm-up + cosine schedule, bf16 autocast on CUDA and fp32 on CPU (text_steps.autocast),
and prints loss and tokens/s every --log-every steps. The summary compares the mean training loss of the
first and of the last --window steps (the check: it must fall), gives held-out loss/accuracy before and
after (text_steps.eval_step), the device, dtype, and GPU name and memory on CUDA. Writes JSON (--json)
and exits 1 when a task's loss did not fall.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Import the package from the checkout: no `pip install` on the GPU machine.
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Only these three modelworks modules: none of them (nor modelworks/__init__, modelworks/models/__init__)
# imports Ray; tests/test_bench_text.py checks that a run loads no `ray` module at all.
from modelworks import text_steps  # noqa: E402
from modelworks.data import text as text_data  # noqa: E402
from modelworks.models import transformer  # noqa: E402

TASKS = ("mlm", "classify")
# Share of the rows held out for the before/after evaluation (never trained on).
HELD_OUT_FRACTION = 0.05
# Held-out rows evaluated per task: enough for a stable accuracy, few enough to stay quick on a CPU.
MAX_HELD_OUT = 2048
# Linear warm-up over this share of the steps (as workflows/sst2.py pre-trains), then cosine to 0.
WARMUP_RATIO = 0.06
# BERT's masking rate.
MASK_PROB = 0.15
# Weight decay on weight matrices only (text_steps.param_groups), as the workflows use.
WEIGHT_DECAY = 0.01


# ------------------------------------------------------------------------------------------------ data
def read_sst2(path: Path, rows: int | None) -> tuple[list[str], list[str]]:
    """(texts, labels) from SST-2's train.csv.gz (columns text,label). The csv module, not pandas: one
    dependency fewer on the GPU machine."""
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["text"].strip():
                texts.append(row["text"])
                labels.append(row["label"])
            if rows and len(texts) >= rows:
                break
    return texts, labels


# Synthetic vocabulary. The label is the polarity of the adjectives, so a classifier can learn it; each
# noun has a fixed verb, so the masked LM can learn more than word frequencies.
_POSITIVE = "good great fine superb lovely brilliant charming moving witty warm".split()
_NEGATIVE = "bad awful dull weak boring clumsy tedious bland stale flat".split()
_NOUNS = "film plot cast story script score scene ending director actor".split()
_VERBS = "works shines moves drags sags holds lands fails grips fades".split()
_INTENSIFIERS = "very really quite so rather truly".split()


def synthetic_corpus(rows: int, random_seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(random_seed)
    texts, labels = [], []
    for _ in range(rows):
        label = rng.randrange(2)
        adjectives = _POSITIVE if label else _NEGATIVE
        words = []
        for _clause in range(rng.randint(1, 3)):
            noun = rng.randrange(len(_NOUNS))
            if rng.random() < 0.3:
                words.append(rng.choice(_INTENSIFIERS))
            words += ["the", rng.choice(adjectives), _NOUNS[noun], _VERBS[noun], "and"]
        texts.append(" ".join(words[:-1]) + " .")
        labels.append(str(label))
    return texts, labels


def load_data(args) -> tuple[str, list[str], list[str]]:
    sst2 = Path(args.data_dir) / "sst2" / "train.csv.gz" if args.data_dir else None
    if args.data == "sst2" or (args.data == "auto" and sst2 is not None and sst2.is_file()):
        if sst2 is None or not sst2.is_file():
            raise SystemExit(f"--data sst2: no {sst2}; set MODELWORKS_DATA_DIR or --data-dir")
        return "sst2", *read_sst2(sst2, args.rows)
    return "synthetic", *synthetic_corpus(args.rows or 20_000, args.random_seed)


# --------------------------------------------------------------------------------------------- helpers
def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(choice)


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for queued kernels before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model, rows: dict, task: str, vocab_size: int, batch_size: int, device) -> dict:
    """Held-out mean loss and accuracy (masked-token accuracy for the MLM), with fixed masks."""
    total = text_steps.evaluate_rows(model, rows, task, vocab_size, MASK_PROB, device, batch_size)
    return {"loss": total["loss_sum"] / max(total["count"], 1), "accuracy": total["correct"] / max(total["count"], 1)}


def window_mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# ----------------------------------------------------------------------------------------------- train
def run_task(task: str, args, pre: text_data.TextPreprocessor, train: dict, held_out: dict,
             device: torch.device) -> dict:
    spec = {"name": "transformer", "head": task, "vocab_size": pre.vocab_size, "max_len": pre.max_len,
            "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
            "d_ff": args.d_ff or 4 * args.d_model, "dropout": args.dropout, "pad_id": text_data.PAD_ID,
            "num_classes": max(pre.num_classes, 2), "pooling": "mean", "use_sdpa": not args.no_sdpa}
    torch.manual_seed(args.random_seed)
    model = transformer.build(spec).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(text_steps.param_groups(model, WEIGHT_DECAY), lr=args.lr, betas=(0.9, 0.98),
                                  fused=device.type == "cuda")
    warmup = int(WARMUP_RATIO * args.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: text_steps.warmup_cosine(s, warmup, args.steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = evaluate(model, held_out, task, pre.vocab_size, args.batch_size, device)
    print(f"\n== {task}: {params / 1e6:.2f} M parameters, {args.steps} steps of batch {args.batch_size}; "
          f"held-out loss before {before['loss']:.4f}, accuracy {before['accuracy']:.4f}", flush=True)

    gen = torch.Generator().manual_seed(args.random_seed)
    batches: list[np.ndarray] = []
    losses, window_tokens, total_tokens, timed_tokens, timed_s = [], 0, 0, 0, 0.0
    sync(device)
    t_start = t_window = time.perf_counter()
    for step in range(1, args.steps + 1):
        if not batches:  # a new epoch of length-bucketed batches
            batches = text_data.length_bucketed_batches(train["length"], args.batch_size, gen)
            if not batches:
                raise SystemExit(f"fewer training rows ({len(train['length'])}) than one batch ({args.batch_size})")
        batch = text_steps.make_batch(train, batches.pop(), task, pre.vocab_size, MASK_PROB, gen, device)
        out = text_steps.train_step(model, optimizer, [batch], scheduler=scheduler, max_grad_norm=1.0,
                                    device=device)
        if not math.isfinite(out["loss"]):
            raise SystemExit(f"{task}: loss is {out['loss']} at step {step}")
        losses.append(out["loss"])
        window_tokens += out["tokens"]
        total_tokens += out["tokens"]
        if step % args.log_every == 0 or step == args.steps:
            sync(device)
            now = time.perf_counter()
            rate = window_tokens / (now - t_window)
            # The first window holds one-off costs (CUDA context, kernel selection, allocator growth): the
            # summary's tokens/s leaves it out whenever there is more than one window.
            if step > args.log_every or step == args.steps:
                timed_tokens, timed_s = timed_tokens + window_tokens, timed_s + (now - t_window)
            recent = losses[-args.log_every:]
            print(f"  step {step:5d}  loss {window_mean(recent):.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{rate:10.0f} tokens/s", flush=True)
            window_tokens, t_window = 0, now
    wall = time.perf_counter() - t_start
    after = evaluate(model, held_out, task, pre.vocab_size, args.batch_size, device)
    window = max(1, min(args.window, args.steps // 4))
    first, last = window_mean(losses[:window]), window_mean(losses[-window:])
    result = {
        "spec": spec, "parameters": params, "steps": args.steps, "batch_size": args.batch_size,
        "tokens": total_tokens, "train_s": wall,
        "tokens_per_s": timed_tokens / max(timed_s, 1e-9),
        "tokens_per_s_incl_warmup": total_tokens / max(wall, 1e-9),
        "window": window, "first_window_loss": first, "last_window_loss": last, "loss_fell": last < first,
        "held_out_before": before, "held_out_after": after, "losses": losses,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=[*TASKS, "both"], default="both")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--data", choices=["auto", "sst2", "synthetic"], default="auto",
                   help="auto: SST-2 when the file exists, else synthetic")
    p.add_argument("--data-dir", default=os.environ.get("MODELWORKS_DATA_DIR", ""))
    p.add_argument("--rows", type=int, default=None, help="cap on rows (SST-2: all 67,349; synthetic: 20,000)")
    # Defaults: workflows/sst2.py's model (d_model 128, 4 layers, 4 heads, d_ff 4x, max_len 64).
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=None, help="default 4 x d-model")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--window", type=int, default=50, help="steps averaged for the first/last loss (<= steps/4)")
    p.add_argument("--no-sdpa", action="store_true", help="the written-out attention instead of the fused one")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default torch's); 1 is faster on a CPU shared with other jobs")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--json", default=str(REPO / "bench/results/gpu_check.json"))
    args = p.parse_args()

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        # TF32 for any matmul left in fp32 outside autocast (the optimizer, fp32 loss); bf16 does the rest.
        torch.backends.cuda.matmul.allow_tf32 = True
    source, texts, labels = load_data(args)
    t0 = time.perf_counter()
    pre = text_data.fit(texts, labels, {}, args.vocab_size, args.max_len)
    ids, lengths = pre.encode(texts)
    y = pre.encode_labels(labels)
    print(f"data: {source}, {len(texts)} rows, BPE {pre.vocab_size} tokens (fitted in "
          f"{time.perf_counter() - t0:.1f} s), mean {lengths.mean():.1f} tokens/row, max_len {args.max_len}")

    # Hold out a random share for the before/after evaluation. It comes from the training file (SST-2's
    # phrases overlap each other), so its accuracy says "it learns", not how good the model is.
    order = np.random.default_rng(args.random_seed).permutation(len(texts))
    n_held = min(MAX_HELD_OUT, max(1, int(HELD_OUT_FRACTION * len(texts))))
    held, kept = order[:n_held], order[n_held:]
    train, held_out = ({"ids": ids[rows], "length": lengths[rows], "y": y[rows]} for rows in (kept, held))

    env = {"device": str(device), "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
           "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported())
    print("  ".join(f"{k}={v}" for k, v in env.items()))

    results = {"env": env, "data": {"source": source, "rows": len(texts), "train_rows": len(kept),
                                    "held_out_rows": n_held, "vocab_size": pre.vocab_size,
                                    "mean_tokens_per_row": float(lengths.mean())},
               "args": vars(args), "tasks": {}}
    for task in (TASKS if args.task == "both" else (args.task,)):
        results["tasks"][task] = run_task(task, args, pre, train, held_out, device)

    print(f"\n== summary: {env['device']} ({env.get('gpu', platform.processor() or 'cpu')}), {env['dtype']}, "
          f"data {source}")
    for task, r in results["tasks"].items():
        mem = f", peak {r['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in r else ""
        print(f"  {task:>8}: loss {r['first_window_loss']:.4f} (first {r['window']} steps) -> "
              f"{r['last_window_loss']:.4f} (last {r['window']})  {'falls' if r['loss_fell'] else 'DOES NOT FALL'}; "
              f"held-out loss {r['held_out_before']['loss']:.4f} -> {r['held_out_after']['loss']:.4f}, "
              f"accuracy {r['held_out_before']['accuracy']:.4f} -> {r['held_out_after']['accuracy']:.4f}; "
              f"{r['tokens_per_s']:.0f} tokens/s{mem}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["loss_fell"] for r in results["tasks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
