"""How much does masked-LM pre-training add on SST-2? workflows/sst2.py's two steps (pretrain -> fine-tune),
in plain PyTorch without Ray, over a grid of random seeds x pre-training epochs (0 = from scratch, the
baseline) x fine-tuning epochs, with validation and test accuracy for every cell and the gain over the
baseline at equal fine-tuning budget.

    python bench/pretrain_gain.py --data-dir ../shared/data                       # seeds 0-2, 0/40 epochs
    python bench/pretrain_gain.py --seeds 0,1,2,3,4,5 --pretrain-epochs 0,40,80 --finetune-epochs 2,3 \\
        --processes 8                                                              # a GPU takes several

One seed's swing on the 872 validation sentences (about +-1.3 points) is larger than the effect, so the
answer needs many seeds; on 2 CPU cores one chain costs ~20 minutes, on a GPU seconds. Each (seed,
pre-training epochs) pair is one job; jobs run in --processes worker processes (a step of this small model
is mostly kernel-launch time, so one GPU serves several processes at once).

Settings are the workflow's (MODEL, PRETRAIN, FINETUNE below; tests/test_bench_text.py checks they match
workflows/sst2.py). Data, tokenizer and batches are made as the workflow makes them: the BPE tokenizer
fitted on the training split, pre-training on its whole sentences (text.drop_contained), rows in content
order, length-bucketed batches seeded per epoch, the fine-tuned encoder loaded from the pre-trained one,
the best fine-tuning epoch chosen by validation accuracy. bf16 autocast on CUDA, fp32 on CPU (text_steps).
Needs torch, numpy and tokenizers only. Writes JSON (--json) after every finished job.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # no `pip install` on a GPU machine
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpu_check import read_sst2  # noqa: E402
from modelworks import text_steps  # noqa: E402
from modelworks.data import text as text_data  # noqa: E402
from modelworks.models import transformer  # noqa: E402

# workflows/sst2.py's settings (config fields of the same names).
MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512, "max_len": 64, "vocab_size": 8000,
         "dropout": 0.1, "pooling": "mean"}
PRETRAIN = {"epochs": 40, "batch_size": 32, "lr": 7e-4, "min_lr": 0.0, "warmup_ratio": 0.06, "weight_decay": 0.01,
            "beta2": 0.98, "grad_clip": 1.0, "mask_prob": 0.15, "dropout": 0.1}
FINETUNE = {"epochs": 3, "batch_size": 32, "lr": 2e-4, "min_lr": 0.0, "warmup_ratio": 0.1, "weight_decay": 0.01,
            "beta2": 0.999, "grad_clip": 1.0}


# ------------------------------------------------------------------------------------------------ data
def prepare(args, folder: Path) -> dict:
    """Read SST-2, fit the tokenizer on the training split, encode every split once; arrays go to
    ``folder`` (the worker processes load them) and a summary comes back."""
    d = Path(args.data_dir) / "sst2"
    splits = {s: read_sst2(d / f"{s}.csv.gz", args.rows if s == "train" else None)
              for s in ("train", "validation", "test")}
    pre = text_data.fit(splits["train"][0], splits["train"][1], {}, args.vocab_size, MODEL["max_len"])
    arrays = {}
    for s, (texts, labels) in splits.items():
        ids, length = pre.encode(texts)
        arrays.update({f"{s}_ids": ids, f"{s}_length": length, f"{s}_y": pre.encode_labels(labels)})
    whole = text_data.drop_contained(splits["train"][0])
    arrays["corpus_ids"], arrays["corpus_length"] = pre.encode(whole)
    np.savez(folder / "arrays.npz", **arrays)
    return {"vocab_size": pre.vocab_size, "max_len": pre.max_len, "num_classes": pre.num_classes,
            "rows": {s: len(t) for s, (t, _) in splits.items()}, "corpus_rows": len(whole)}


def load_rows(folder: Path, split: str, labelled: bool = True) -> dict[str, np.ndarray]:
    with np.load(folder / "arrays.npz") as z:
        rows = {"ids": z[f"{split}_ids"], "length": z[f"{split}_length"]}
        if labelled:
            rows["y"] = z[f"{split}_y"]
    return text_data.content_order(rows)  # as a Ray Train worker orders its shard: the seeded batches match


# ----------------------------------------------------------------------------------------------- train
def evaluate(model, rows, task, vocab_size, device) -> dict:
    total = text_steps.evaluate_rows(model, rows, task, vocab_size, PRETRAIN["mask_prob"], device)
    return {"loss": total["loss_sum"] / max(total["count"], 1), "accuracy": total["correct"] / max(total["count"], 1)}


def fit(model, task, rows, hp, epochs, random_seed, vocab_size, device, evaluate_on) -> list[dict]:
    """train_text.text_train_loop's schedule on one worker: AdamW (decay on matrices only), warm-up then
    cosine per optimizer step, clipping; after each epoch, the metrics of every split in ``evaluate_on``."""
    mask_prob = PRETRAIN["mask_prob"]
    steps = len(rows["length"]) // hp["batch_size"]
    total = max(1, steps * epochs)
    warmup = int(hp["warmup_ratio"] * total)
    optimizer = torch.optim.AdamW(text_steps.param_groups(model, hp["weight_decay"]), lr=hp["lr"],
                                  betas=(0.9, hp["beta2"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: text_steps.warmup_cosine(s, warmup, total, hp["min_lr"] / hp["lr"]))
    history = []
    for epoch in range(1, epochs + 1):
        gen = torch.Generator().manual_seed(random_seed * 100_003 + epoch * 1009)  # rank 0's
        t0, loss_sum, targets = time.perf_counter(), 0.0, 0
        for idx in text_data.length_bucketed_batches(rows["length"], hp["batch_size"], gen)[:steps]:
            batch = text_steps.make_batch(rows, idx, task, vocab_size, mask_prob, gen, device)
            out = text_steps.train_step(model, optimizer, [batch], scheduler=scheduler, max_grad_norm=hp["grad_clip"],
                                        device=device)
            loss_sum, targets = loss_sum + out["loss"] * out["targets"], targets + out["targets"]
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(targets, 1), "train_s": time.perf_counter() - t0}
        for split, split_rows in evaluate_on.items():
            m = evaluate(model, split_rows, task, vocab_size, device)
            metrics.update({f"{split}_loss": m["loss"], f"{split}_accuracy": m["accuracy"]})
        history.append(metrics)
    return history


def spec_for(task: str, info: dict, args) -> dict:
    return {"name": "transformer", "head": task, "vocab_size": info["vocab_size"], "max_len": info["max_len"],
            "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads, "d_ff": 4 * args.d_model,
            "dropout": PRETRAIN["dropout"] if task == "mlm" else MODEL["dropout"], "pad_id": text_data.PAD_ID,
            "pooling": MODEL["pooling"], "use_sdpa": True, "num_classes": info["num_classes"]}


# ------------------------------------------------------------------------------------------------- job
def run_job(folder: str, info: dict, args, random_seed: int, pretrain_epochs: int) -> dict:
    """One seed's pre-training (none when 0), then one fine-tune per --finetune-epochs from it."""
    folder = Path(folder)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train, val, test = load_rows(folder, "train"), load_rows(folder, "validation"), load_rows(folder, "test")
    encoder_state, pretrain_history = None, []
    if pretrain_epochs:
        corpus = load_rows(folder, "corpus", labelled=False)
        torch.manual_seed(random_seed)
        mlm = transformer.build(spec_for("mlm", info, args)).to(device)
        pretrain_history = fit(mlm, "mlm", corpus, PRETRAIN, pretrain_epochs, random_seed, info["vocab_size"],
                               device, {"val": {k: val[k] for k in ("ids", "length")}})
        encoder_state = {k: v.detach().clone() for k, v in mlm.encoder.state_dict().items()}
    finetunes = {}
    for epochs in args.finetune_epochs:
        torch.manual_seed(random_seed)  # the classifier's head starts the same in both arms
        model = transformer.build(spec_for("classify", info, args)).to(device)
        if encoder_state is not None:
            model.encoder.load_state_dict(encoder_state)
        history = fit(model, "classify", train, FINETUNE, epochs, random_seed, info["vocab_size"], device,
                      {"val": val, "test": test})
        best = max(history, key=lambda m: m["val_accuracy"])  # the workflow's evaluate.metric
        finetunes[str(epochs)] = {"best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
                                  "test_accuracy": best["test_accuracy"], "history": history}
    return {"random_seed": random_seed, "pretrain_epochs": pretrain_epochs, "pretrain_history": pretrain_history,
            "finetune": finetunes, "wall_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------- summary
def summarise(jobs: list[dict]) -> list[dict]:
    """Per (pre-training epochs, fine-tuning epochs): mean best validation and test accuracy over the seeds,
    and the mean gain over from-scratch runs of the same seeds and fine-tuning epochs."""
    cell = {(j["pretrain_epochs"], f, j["random_seed"]): r for j in jobs for f, r in j["finetune"].items()}
    rows = []
    for p, f in sorted({(p, f) for p, f, _ in cell}, key=lambda k: (int(k[1]), k[0])):
        seeds = sorted(s for pp, ff, s in cell if (pp, ff) == (p, f))
        val = [cell[p, f, s]["val_accuracy"] for s in seeds]
        test = [cell[p, f, s]["test_accuracy"] for s in seeds]
        row = {"pretrain_epochs": p, "finetune_epochs": int(f), "seeds": seeds, "val": val, "test": test,
               "mean_val": statistics.mean(val), "mean_test": statistics.mean(test)}
        paired = [s for s in seeds if (0, f, s) in cell]
        if p and paired:
            row["gain_val"] = [cell[p, f, s]["val_accuracy"] - cell[0, f, s]["val_accuracy"] for s in paired]
            row["gain_test"] = [cell[p, f, s]["test_accuracy"] - cell[0, f, s]["test_accuracy"] for s in paired]
        rows.append(row)
    return rows


def print_summary(rows: list[dict]) -> None:
    print("\n  pretrain  finetune  seeds  mean val   mean test  gain val (mean; per seed)            gain test (mean)")
    for r in rows:
        gain = ""
        if "gain_val" in r:
            per = " ".join(f"{100 * g:+.2f}" for g in r["gain_val"])
            gain = (f"{100 * statistics.mean(r['gain_val']):+.2f} ({per})".ljust(40)
                    + f"{100 * statistics.mean(r['gain_test']):+.2f}")
        print(f"  {r['pretrain_epochs']:8d}  {r['finetune_epochs']:8d}  {len(r['seeds']):5d}  "
              f"{100 * r['mean_val']:7.2f} %  {100 * r['mean_test']:7.2f} %  {gain}")


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MODELWORKS_DATA_DIR", ""))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2])
    p.add_argument("--pretrain-epochs", type=ints, default=[0, PRETRAIN["epochs"]], help="0 = from scratch")
    p.add_argument("--finetune-epochs", type=ints, default=[FINETUNE["epochs"]])
    p.add_argument("--processes", type=int, default=1, help="jobs run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--rows", type=int, default=None, help="cap on training rows (tests)")
    p.add_argument("--d-model", type=int, default=MODEL["d_model"])
    p.add_argument("--layers", type=int, default=MODEL["n_layers"])
    p.add_argument("--heads", type=int, default=MODEL["n_heads"])
    p.add_argument("--vocab-size", type=int, default=MODEL["vocab_size"], help="the BPE tokenizer's size")
    p.add_argument("--json", default=str(REPO / "bench/results/pretrain_gain.json"))
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (Path(args.data_dir) / "sst2" / "train.csv.gz").is_file():
        raise SystemExit(f"no {Path(args.data_dir) / 'sst2' / 'train.csv.gz'}; set MODELWORKS_DATA_DIR or --data-dir")

    t0 = time.perf_counter()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"device": args.device, "torch": torch.__version__, "cpus": os.cpu_count()}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as folder:
        info = prepare(args, Path(folder))
        print(f"data: {info['rows']}, pre-training corpus {info['corpus_rows']} whole sentences, BPE "
              f"{info['vocab_size']} tokens ({time.perf_counter() - t0:.1f} s); device {env}", flush=True)
        # Seed by seed (a run cut short still has whole pairs to compare), each seed's longest job first.
        grid = [(s, pe) for s in args.seeds for pe in sorted(args.pretrain_epochs, reverse=True)]
        jobs: list[dict] = []
        # spawn: CUDA cannot be used in a forked child.
        with ProcessPoolExecutor(args.processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_job, folder, info, args, s, pe) for s, pe in grid]
            for future in as_completed(futures):
                job = future.result()
                jobs.append(job)
                fts = ", ".join(f"{f} ep: val {100 * r['val_accuracy']:.2f} test {100 * r['test_accuracy']:.2f}"
                                for f, r in job["finetune"].items())
                mlm = (f"masked-LM val loss {job['pretrain_history'][-1]['val_loss']:.3f}; "
                       if job["pretrain_history"] else "")
                print(f"  seed {job['random_seed']}, pretrain {job['pretrain_epochs']:3d} epochs: {mlm}{fts} "
                      f"({job['wall_s']:.0f} s; {time.perf_counter() - t0:.0f} s so far)", flush=True)
                out.write_text(json.dumps({"env": env, "data": info, "args": vars(args), "jobs": jobs,
                                           "summary": summarise(jobs)}, indent=1))
    print_summary(summarise(jobs))
    print(f"whole run {time.perf_counter() - t0:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
