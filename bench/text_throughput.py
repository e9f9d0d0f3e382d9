"""Transformer training throughput (real tokens/s), side by side in one run on one machine, then ratios:

  plain      text_steps.train_step in a plain PyTorch loop over length-bucketed batches in memory
  mw1, mw2   modelworks: Ray Data -> the object store -> Ray Train TorchTrainer (train_text.fit_text, task "classify")
             with 1 and 2 workers, on a real local Ray

All variants train workflows/sst2.py's classifier (d_model 128, 4 layers, 4 heads, d_ff 512, max_len 64,
BPE 8,000; AdamW, global batch 32, its lr schedule) on the same SST-2 training sentences (the first
--rows of train.csv.gz) with the same fitted tokenizer, for --epochs epochs. The plain loop is
text_train_loop's epoch minus Ray: the same model spec, seed, optimizer, batch order (the same generator
seeds as rank 0) and text_steps.make_batch. As in bench/train_throughput.py the plain figure is the better
of 1 intra-op thread and the count a single local worker is given (all cores): on a CPU shared with other
jobs, two threads that spin-wait on each other can be many times slower than one.

A figure is tokens/s as the training loop reports it: real (non-padding) tokens trained in an epoch divided
by that epoch's training-loop time (validation and checkpoints excluded), the median over the epochs after
the first (warm-up: first-touch allocation, DDP's first buckets). For modelworks the rates are read from
the last checkpoint's metrics.json history; its whole-run wall time (workers start, ingest, preprocessing,
validation, checkpoints) is reported as well.

    .venv/bin/python bench/text_throughput.py --data-dir ../shared/data              # 20,000 rows x 3 epochs, x2
    .venv/bin/python bench/text_throughput.py --rows 3000 --epochs 3                 # a quick look

The plain loop's thread count is probed first (one run per count, not counted). Then the plain loop and
modelworks with 1 worker run --repeat times each, alternating (mw1, plain, plain, mw1, ...), and their
medians are compared: this machine's speed drifts by 25-30 % within minutes, and a fixed order hands the drift
to one side. Ray is started for each modelworks run and shut down after it, so the plain loop never shares the
CPUs with an idle Ray. Other worker counts run once each at the end.

On a machine shared with other jobs the figures are noisy: compare ratios from the same run only.
Ray's own output (its INFO lines, the workers' lines echoed to the driver) goes to <--out>.ray.log, as a
`modelworks run` sends it to runs/<run>/logs/ray.log; the terminal shows the bench's lines only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs from a checkout without `pip install -e .` too

from modelworks import text_steps  # noqa: E402
from modelworks.console import capture_process_output, terminal_copy  # noqa: E402
from modelworks.config import WorkflowConfig, apply_overrides, load_workflow  # noqa: E402
from modelworks.data import text as text_data  # noqa: E402
from modelworks.models import build_model  # noqa: E402

WORKFLOW = REPO / "workflows/sst2.py"
# The target this bench is judged against: Ray Train with one worker keeps >= 90 % of the plain loop.
TARGET_MW1_VS_PLAIN = 0.9
# Where the bench's own lines go: the terminal, kept as a copy once main() sends fds 1 and 2 to the Ray log.
terminal = sys.stdout


def say(line: str) -> None:
    print(line, file=terminal, flush=True)


def load_sst2(folder: Path, rows: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """(train: the first `rows` training sentences, val: the official validation split, label names)."""
    read = lambda name: pd.read_csv(folder / name, dtype=str, keep_default_na=False)  # noqa: E731
    train, val = read("train.csv.gz").head(rows).reset_index(drop=True), read("validation.csv.gz")
    names_file = folder / "labels.txt"
    names = [n for n in names_file.read_text().splitlines() if n] if names_file.is_file() else []
    return train, val, {str(i): n for i, n in enumerate(names)}


def config(epochs: int, workers: int) -> WorkflowConfig:
    return apply_overrides(load_workflow(WORKFLOW), [f"train.epochs={epochs}", f"train.workers={workers}",
                                                     "pretrain.enabled=false"])


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


# ------------------------------------------------------------------------------------------ plain loop
def bench_plain(cfg: WorkflowConfig, pre: text_data.TextPreprocessor, spec: dict, train: pd.DataFrame,
                threads: int) -> dict:
    """text_train_loop's epochs for one rank with the Ray calls taken out; returns per-epoch tokens/s."""
    hp, device = cfg.train, torch.device("cpu")
    torch.set_num_threads(threads)
    ids, lengths = pre.encode(train["text"].tolist())
    rows = {"ids": ids, "length": lengths, "y": pre.encode_labels(train["label"].tolist())}
    torch.manual_seed(hp.random_seed)
    model = build_model(spec)
    steps = len(lengths) // hp.batch_size
    total_steps = max(1, steps * hp.epochs)
    warmup = int(hp.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(text_steps.param_groups(model, hp.weight_decay), lr=hp.lr, betas=(0.9, hp.beta2))
    schedule = (lambda s: 1.0) if hp.lr_schedule == "constant" else (
        lambda s: text_steps.warmup_cosine(s, warmup, total_steps, hp.min_lr / hp.lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rates, losses = [], []
    for epoch in range(1, hp.epochs + 1):
        gen = torch.Generator().manual_seed(hp.random_seed * 100_003 + epoch * 1009)  # rank 0's seed in text_train_loop
        batches = text_data.length_bucketed_batches(lengths, hp.batch_size, gen)[:steps]
        t0, tokens, loss_sum, targets = time.perf_counter(), 0, 0.0, 0
        for idx in batches:
            batch = text_steps.make_batch(rows, idx, "classify", pre.vocab_size, 0.0, gen, device)
            out = text_steps.train_step(model, optimizer, [batch], scheduler=scheduler, max_grad_norm=hp.grad_clip,
                                        label_smoothing=hp.label_smoothing, device=device)
            tokens += out["tokens"]
            loss_sum += out["loss"] * out["targets"]
            targets += out["targets"]
        rates.append(tokens / (time.perf_counter() - t0))
        losses.append(loss_sum / max(targets, 1))
        say(f"    plain epoch {epoch}/{hp.epochs}: {rates[-1]:8.0f} tokens/s  train_loss={losses[-1]:.4f}")
    return {"rates": rates, "train_loss": losses, "threads": threads, "steps_per_epoch": steps}


# ----------------------------------------------------------------------------------------- modelworks
def bench_modelworks(cfg: WorkflowConfig, pre: text_data.TextPreprocessor, spec: dict, train: pd.DataFrame,
                     val: pd.DataFrame, storage: Path, name: str) -> dict:
    """A real fit_text run on the local Ray; per-epoch rates read back from its last checkpoint."""
    import ray

    from modelworks import train_text

    # As the workflow feeds fit_text: raw rows -> the fitted TextPreprocessor in Ray Data's map_batches.
    datasets = {"train": pre.apply(ray.data.from_pandas(train)), "val": pre.apply(ray.data.from_pandas(val))}
    t0 = time.perf_counter()
    run_dir = train_text.fit_text(cfg, "classify", datasets, pre, spec, storage, name, log=lambda m: None)
    wall = time.perf_counter() - t0
    last = json.loads((run_dir / f"checkpoint_epoch={cfg.train.epochs}" / "metrics.json").read_text())
    history = last["history"]
    tokens = sum(h["tokens_per_s"] * h["train_samples"] / h["samples_per_s"] for h in history)
    return {"rates": [h["tokens_per_s"] for h in history], "train_loss": [h["train_loss"] for h in history],
            "val_accuracy": [h["val_accuracy"] for h in history], "wall_s": wall,
            "end_to_end_tokens_per_s": tokens / wall}


def worker_counts(text: str) -> list[int]:
    try:
        counts = [int(w) for w in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of worker counts: give e.g. --workers 1,2")
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MODELWORKS_DATA_DIR", str(REPO.parent / "shared/data")))
    # 20,000 sentences (~30 % of SST-2) x 3 epochs: each variant trains ~800k tokens, a few minutes in all
    # on 2 CPU cores; every epoch is long enough (625 steps) for a stable rate.
    p.add_argument("--rows", type=int, default=20_000, help="training sentences used (SST-2 has 67,349)")
    p.add_argument("--epochs", type=int, default=3, help="the first is warm-up and left out of the figures")
    p.add_argument("--workers", default=[1, 2], type=worker_counts,
                   help="modelworks worker counts to run, comma-separated (1 always runs)")
    p.add_argument("--repeat", type=int, default=2, help="runs of the plain loop and of 1 worker, alternating "
                                                         "(mw1, plain, plain, mw1, ...); medians compared")
    p.add_argument("--plain-threads", default=None, help="intra-op thread counts tried for the plain loop, "
                                                         "best kept (default: 1 and all cores)")
    p.add_argument("--mw-threads", type=int, default=None,
                   help="diagnostic: intra-op threads per worker instead of plan_cpus's (all cores / workers)")
    p.add_argument("--out", default=str(REPO / "bench/results/text_throughput.json"))
    args = p.parse_args()
    folder = Path(args.data_dir) / "sst2"
    if not (folder / "train.csv.gz").is_file():
        raise SystemExit(f"SST-2 not found under {args.data_dir}; pass --data-dir or set MODELWORKS_DATA_DIR")
    global terminal
    terminal, ray_log = terminal_copy(1), Path(args.out).with_suffix(".ray.log")
    capture_process_output(ray_log)

    base = config(args.epochs, 1)
    train, val, names = load_sst2(folder, args.rows)
    # Fitted once, shared by every variant: same vocabulary, same token ids, same model size.
    pre = text_data.fit(train["text"].tolist(), train["label"].tolist(), names, base.model.vocab_size,
                        base.model.max_len)
    from modelworks.train_text import text_model_spec

    spec = text_model_spec(base, pre, "classify")
    # plan_cpus gives one local worker all cores as intra-op threads; the plain loop tries that and 1.
    plain_threads = sorted({int(t) for t in args.plain_threads.split(",")} if args.plain_threads
                           else {1, os.cpu_count() or 1})
    results: dict = {"rows": len(train), "epochs": args.epochs, "batch_size": base.train.batch_size,
                     "cpus": os.cpu_count(), "spec": spec,
                     "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    say(f"SST-2: {len(train)} training sentences, {pre.vocab_size} BPE tokens, batch "
        f"{base.train.batch_size}, {args.epochs} epochs; load average {results['load_avg_at_start']}")
    say(f"Ray's output: {ray_log}")

    def run_plain(threads: int) -> dict:
        r = bench_plain(base, pre, spec, train, threads)
        r["tokens_per_s"] = steady(r["rates"])
        say(f"    plain: {r['tokens_per_s']:9.0f} tokens/s   per epoch {[round(x) for x in r['rates']]} "
            f"({threads} thread(s))")
        return r

    # As bench/train_throughput.py: a throwaway MODELWORKS_HOME, no progress bars, and Ray started the way
    # every modelworks run starts it (workflow.ensure_ray: private local cluster, fast Train polling). Ray runs
    # only during modelworks' runs: an idle Ray beside the plain loop would take CPU from it.
    home = Path(tempfile.mkdtemp(prefix="mw-text-bench-"))
    os.environ.update({"MODELWORKS_HOME": str(home), "MODELWORKS_PROGRESS": "0"})
    import ray

    from modelworks import train as mw_train  # not `train`: that name is the training sentences here
    from modelworks.workflow import ensure_ray

    planned = mw_train.plan_cpus
    if args.mw_threads:  # diagnostic only: the workers' thread count instead of what plan_cpus decides
        mw_train.plan_cpus = lambda w, gpu, **kw: dataclasses.replace(planned(w, gpu, **kw), threads=args.mw_threads)

    def run_modelworks(workers: int, n: int) -> dict:
        ensure_ray()
        try:
            r = bench_modelworks(config(args.epochs, workers), pre, spec, train, val, home / "runs", f"mw{workers}_{n}")
            r["threads_per_worker"] = mw_train.plan_cpus(workers, False).threads
        finally:
            ray.shutdown()
        r["tokens_per_s"] = steady(r["rates"])
        say(f"      mw{workers}: {r['tokens_per_s']:9.0f} tokens/s   per epoch {[round(x) for x in r['rates']]}"
            f"   whole run {r['wall_s']:.1f} s ({r['end_to_end_tokens_per_s']:.0f} tokens/s incl. worker "
            f"start, ingest, validation, checkpoints; {r['threads_per_worker']} thread(s) per worker)")
        return r

    try:
        # 1. The plain loop's thread count: the faster of those tried (one run each, not counted below).
        probes = {threads: run_plain(threads) for threads in plain_threads}
        for threads, r in probes.items():
            results[f"plain_{threads}_threads"] = r
        best_threads = max(probes, key=lambda t: probes[t]["tokens_per_s"])
        # 2. modelworks' 1 worker against that loop, alternating (mw1, plain, plain, mw1, ...): the machine's
        # speed drifts by 25-30 % within minutes, and a fixed order would hand the drift to one side.
        runs: dict[str, list[dict]] = {"plain": [], "mw1": []}
        order = [v for i in range(args.repeat) for v in (("mw1", "plain") if i % 2 == 0 else ("plain", "mw1"))]
        for n, variant in enumerate(order, 1):
            say(f"[{n}/{len(order)}] {variant}")
            runs[variant].append(run_plain(best_threads) if variant == "plain" else run_modelworks(1, n))
        for variant, rs in runs.items():
            results[variant] = {**rs[len(rs) // 2], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                                "runs": [r["tokens_per_s"] for r in rs], "threads": best_threads}
        results["order"] = order
        # 3. Other worker counts, once each (DDP on one machine: reported, no target).
        for workers in [w for w in args.workers if w != 1]:
            results[f"mw{workers}"] = run_modelworks(workers, len(order) + workers)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    plain = results["plain"]["tokens_per_s"]
    results["ratios"] = {f"{k}_vs_plain": results[k]["tokens_per_s"] / plain for k in results if k.startswith("mw")}
    results["ratios"].update({f"{k}_vs_plain": results[k]["tokens_per_s"] / plain for k in results
                              if k.startswith("plain_") and k != f"plain_{results['plain']['threads']}_threads"})
    say(f"median of {args.repeat} run(s) each: plain {plain:.0f} tokens/s {[round(r) for r in results['plain']['runs']]}, "
        f"mw1 {results['mw1']['tokens_per_s']:.0f} {[round(r) for r in results['mw1']['runs']]}")
    results["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    for k, v in results["ratios"].items():
        say(f"{k:>24}: {v:.2f}x")
    say(f"target: mw1_vs_plain >= {TARGET_MW1_VS_PLAIN}   (load average at end {results['load_avg_at_end']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    say(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc(file=terminal)  # stderr is the Ray log by now
        raise SystemExit(1)
