"""Language-model training, side by side in one run on one machine: tokens/s and time to a validation loss.

  plain   a single-process PyTorch loop: train_lm's step loop minus Ray (the same model spec, seeds, windows,
          AdamW, schedule, clipping and evaluations), on the same character ids
  mw      `modelworks run workflows/shakespeare.py` in-process (run_workflow), 1 worker, its own local Ray

Both run workflows/shakespeare.py's settings (context 64, batch 12, 4 layers, 4 heads, width 128, 2,000 steps,
AdamW, lr 1e-3 -> 1e-4) and evaluate every 250 steps on the same 20 fixed validation batches. Reported:
- tokens/s: training tokens over training-loop time, the median over the evaluation rounds after the first;
- time to val loss <= --target (1.90) at an evaluation: for plain from the loop's start; for mw from before
  `run_workflow` was called (so Ray's start-up and Ray Train's are included), read from the time the
  checkpoint of that evaluation was written; Ray start and trainer start-up are also shown on their own;
- the whole-validation-text loss of each final model (the evaluate step's figure; 111,539 predictions).
Targets (issue 11): mw >= 0.9x plain tokens/s, mw <= 1.2x plain time to 1.90, mw's whole run <= 180 s.

Other jobs on a shared machine move a run's speed by +-25 % over minutes, sometimes in one step. With --repeat 4
(the default) the variants run in the order plain, mw, mw, plain, plain, mw, mw, plain, so a drift that slows
or speeds the machine over the run weighs on both alike, and one step of it moves one median less than with
two runs each; each figure is the median over a variant's runs, and every run is printed too.

    .venv/bin/python bench/lm_throughput.py --data-dir ../shared/data            # ~15 minutes on 2 cores
    .venv/bin/python bench/lm_throughput.py --steps 300 --repeat 1              # a quick look

Compare ratios from the same run only: other load on the machine moves both figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs from a checkout without `pip install -e .` too

from modelworks import text_steps, train_lm  # noqa: E402
from modelworks.config import apply_overrides, load_workflow  # noqa: E402
from modelworks.data import chars, corpus  # noqa: E402
from modelworks.evaluate_lm import text_loss  # noqa: E402
from modelworks.models import build_model  # noqa: E402

TARGET_TOKENS_RATIO, TARGET_TIME_RATIO, TARGET_WHOLE_RUN_S = 0.9, 1.2, 180.0


def plain_loop(cfg, train_ids: np.ndarray, val_ids: np.ndarray, pre, threads: int) -> dict:
    """lm_train_loop with world size 1 and no Ray."""
    torch.set_num_threads(threads)
    hp, context = cfg.train, cfg.model.max_len
    train_t, val_t = torch.from_numpy(train_ids.astype(np.int64)), torch.from_numpy(val_ids.astype(np.int64))
    steps = train_lm.total_steps(cfg, len(train_t))
    val_starts = train_lm.validation_starts(len(val_t), context, hp.eval_batches * hp.batch_size)
    torch.manual_seed(hp.random_seed)
    model = build_model(train_lm.lm_model_spec(cfg, pre))
    optimizer = train_lm.make_optimizer(model, cfg)
    warmup = int(hp.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: text_steps.warmup_cosine(s, warmup, steps, hp.min_lr / hp.lr))
    t_start, history, step = time.perf_counter(), [], 0
    while step < steps:
        round_no = step // hp.eval_every + 1
        end = min(steps, round_no * hp.eval_every)
        gen = torch.Generator().manual_seed(hp.random_seed * 100_003 + round_no * 1009)
        t0 = time.perf_counter()
        for _ in range(end - step):
            x, y = corpus.windows(train_t, torch.randint(len(train_t) - context - 1, (hp.batch_size,), generator=gen),
                                  context)
            text_steps.train_step(model, optimizer, [{"ids": x, "labels": y}], scheduler=scheduler,
                                  max_grad_norm=hp.grad_clip)
        train_time = time.perf_counter() - t0
        tokens = (end - step) * hp.batch_size * context
        step = end
        val = train_lm.evaluate_windows(model, val_t, val_starts, context, hp.batch_size * 4, torch.device("cpu"))
        history.append({"step": step, "val_loss": val["loss_sum"] / val["count"], "tokens_per_s": tokens / train_time,
                        "elapsed_s": time.perf_counter() - t_start})
    whole, _, _ = text_loss(model, val_ids, context)
    return {"history": history, "seconds": time.perf_counter() - t_start, "whole_val_loss": whole}


def modelworks_run(cfg, data_dir: str) -> dict:
    """One whole `modelworks run` in a fresh MODELWORKS_HOME with its own local Ray, shut down afterwards
    (so a second run pays Ray's start-up again, as a separate process would)."""
    import ray

    from modelworks.workflow import run_workflow

    os.environ["MODELWORKS_HOME"] = tempfile.mkdtemp(prefix="mw-bench-lm-")
    os.environ["MODELWORKS_JOIN_RAY"] = "0"
    t0 = time.time()
    try:
        result = run_workflow(cfg, run_name="bench", data_dir=data_dir, log=lambda line: None)
    finally:
        ray.shutdown()
    run_dir = Path(result.run_dir)
    history = json.loads((Path(result.checkpoint).parent / f"checkpoint_step={train_lm.total_steps(cfg, 1)}"
                          / "metrics.json").read_text())["history"] if cfg.train.max_steps else []
    for h in history:  # when that evaluation's checkpoint was written, from before run_workflow was called
        h["elapsed_s"] = (run_dir / f"checkpoint_step={h['step']}" / "metrics.json").stat().st_mtime - t0
    return {"history": history, "seconds": result.seconds, "whole_val_loss": result.val_loss,
            "step_seconds": result.step_seconds, "trainer_startup_s": result.trainer_startup_s.get("train")}


def summarise(run: dict, target: float) -> dict:
    rates = [h["tokens_per_s"] for h in run["history"][1:]] or [h["tokens_per_s"] for h in run["history"]]
    reached = next((h for h in run["history"] if h["val_loss"] <= target), None)
    out = {"tokens_per_s": statistics.median(rates), "time_to_target_s": reached["elapsed_s"] if reached else None,
           "step_at_target": reached["step"] if reached else None,
           "final_val_loss_20_batches": run["history"][-1]["val_loss"], "whole_val_loss": run["whole_val_loss"],
           "seconds": run["seconds"]}
    if "step_seconds" in run:  # a modelworks run
        out.update(step_seconds=run["step_seconds"], ray_start_s=run["step_seconds"].get("ray start", 0.0),
                   trainer_startup_s=run["trainer_startup_s"] or 0.0)
    return out


def combine(runs: list[dict]) -> dict:
    """A variant's figures over its runs: the median of each (the time to the target only when every run
    reached it, and its step only when they all reached it at the same one)."""
    times, steps = [r["time_to_target_s"] for r in runs], {r["step_at_target"] for r in runs}
    out = {"time_to_target_s": statistics.median(times) if None not in times else None,
           "step_at_target": steps.pop() if len(steps) == 1 else None, "runs": runs}
    for key in ("tokens_per_s", "whole_val_loss", "seconds", "ray_start_s", "trainer_startup_s"):
        if key in runs[0]:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def show(name: str, r: dict, target: float) -> str:
    """One line of a run's (or a variant's median) figures."""
    reach = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f} s" + (
        f" (step {r['step_at_target']})" if r["step_at_target"] is not None else "")
    line = (f"{name:>12}: {r['tokens_per_s']:,.0f} tokens/s; val loss <= {target} after {reach}; "
            f"whole-validation loss {r['whole_val_loss']:.4f}; {r['seconds']:.1f} s in all")
    if "trainer_startup_s" in r:
        line += f" (Ray start {r['ray_start_s']:.1f} s, trainer start-up {r['trainer_startup_s']:.1f} s)"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("MODELWORKS_DATA_DIR", str(REPO.parent / "shared/data")))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--target", type=float, default=1.90)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="plain loop's intra-op threads "
                                                                            "(a single local worker gets all cores)")
    ap.add_argument("--repeat", type=int, default=4, help="runs of each variant, alternating: plain, mw, mw, "
                                                               "plain, ...")
    ap.add_argument("--out", default=str(REPO / "bench/results/lm_throughput.json"))
    args = ap.parse_args()
    # Every evaluation's checkpoint is kept: the time to the target loss is read from when it was written.
    cfg = apply_overrides(load_workflow(REPO / "workflows/shakespeare.py"),
                          [f"train.max_steps={args.steps}", "registry.enabled=false", "train.keep_checkpoints=null"])
    text = corpus.read_corpus(cfg.data, Path(args.data_dir), cfg.model.max_len)
    pre = chars.fit(text.train)
    train_ids, val_ids = pre.encode(text.train), pre.encode(text.val)
    runs: dict[str, list] = {"plain": [], "modelworks": []}
    pair = ("plain", "modelworks")
    order = [v for i in range(args.repeat) for v in (pair if i % 2 == 0 else pair[::-1])]
    for n, variant in enumerate(order, 1):
        if variant == "plain":
            print(f"[{n}/{len(order)}] plain loop: {args.steps} steps, {args.threads} thread(s) ...", flush=True)
            r = summarise(plain_loop(cfg, train_ids, val_ids, pre, args.threads), args.target)
        else:
            print(f"[{n}/{len(order)}] modelworks run (1 worker, its own local Ray) ...", flush=True)
            r = summarise(modelworks_run(cfg, args.data_dir), args.target)
        runs[variant].append(r)
        print(show(variant, r, args.target), flush=True)
    plain, mw = combine(runs["plain"]), combine(runs["modelworks"])
    ratios = {"tokens_per_s_mw_vs_plain": mw["tokens_per_s"] / plain["tokens_per_s"],
              "time_to_target_mw_vs_plain": (mw["time_to_target_s"] / plain["time_to_target_s"]
                                             if mw["time_to_target_s"] and plain["time_to_target_s"] else None)}
    print(f"median of {args.repeat} run(s) each:")
    print(show("plain", plain, args.target))
    print(show("modelworks", mw, args.target))
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    print(f"ratios: tokens/s {fmt(ratios['tokens_per_s_mw_vs_plain'])} (target >= {TARGET_TOKENS_RATIO}x); "
          f"time to {args.target} {fmt(ratios['time_to_target_mw_vs_plain'])} (target <= {TARGET_TIME_RATIO}x); "
          f"whole run {mw['seconds']:.1f} s (target <= {TARGET_WHOLE_RUN_S:.0f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "target": args.target, "threads": args.threads,
                                          "repeat": args.repeat, "order": order,
                                          "plain": plain, "modelworks": mw, "ratios": ratios,
                                          "cpus": os.cpu_count(), "torch": torch.__version__}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
