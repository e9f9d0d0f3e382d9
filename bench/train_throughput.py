"""Training throughput on MNIST, side by side in one run on one machine (samples/s, then ratios):

  seed       the founding document's script (section 5.2): torchvision MNIST + DataLoader(batch 64, shuffle)
  inmemory   the same model and batch in a plain loop over in-memory tensors: the machine's ceiling
  mw1, mw2   modelworks (Ray Data -> Ray Train TorchTrainer) with 1 and 2 workers

Every variant trains the seed's model (784-256-128-10, Adam 1e-3, batch 64) for --epochs epochs; figures
are the median of the per-epoch training-loop rates after the first epoch (warm-up). For modelworks the
whole-run wall time (Ray start, ingest, preprocessing, checkpoints, evaluation) is reported as well.

    .venv/bin/python bench/train_throughput.py --data-dir ../shared/data --epochs 3
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def seed_model() -> nn.Module:
    from modelworks.models.mlp import MLP

    return MLP(784, [256, 128], 10)


def train_epochs(batches_fn, epochs: int) -> list[float]:
    """The seed's loop (Adam 1e-3, cross-entropy); returns samples/s per epoch."""
    torch.manual_seed(0)
    model, loss_fn = seed_model(), nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates = []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for x, y in batches_fn():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            n += len(y)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def bench_seed(mnist_dir: Path, epochs: int) -> list[float]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    root = Path(tempfile.mkdtemp())
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (mnist_dir / "raw").glob("*.gz"):  # torchvision reads the unpacked files
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train = datasets.MNIST(root=str(root), train=True, download=False, transform=transform)
    loader = DataLoader(train, batch_size=64, shuffle=True)
    try:
        return train_epochs(lambda: loader, epochs)
    finally:
        shutil.rmtree(root)


def bench_inmemory(mnist_dir: Path, epochs: int) -> list[float]:
    from modelworks.data import idx

    pair = idx.open_split(mnist_dir, "mnist", "train", allow_download=False)
    x = torch.from_numpy(idx.read_rows(pair.images, 0, pair.rows).reshape(-1, 784).astype("float32") / 255)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(idx.read_rows(pair.labels, 0, pair.rows).astype("int64"))

    def batches():
        perm = torch.randperm(len(x))
        return ((x[i], y[i]) for i in perm.split(64))

    return train_epochs(batches, epochs)


def bench_modelworks(data_dir: Path, epochs: int, workers: int) -> dict:
    """A real modelworks run in a child process (its own Ray), read back from its checkpoints."""
    import subprocess

    home = Path(tempfile.mkdtemp())
    env = {**os.environ, "MODELWORKS_HOME": str(home), "MODELWORKS_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "modelworks.cli", "run", str(REPO / "workflows/mnist.py"), "--data-dir",
           str(data_dir), "--workers", str(workers), "--set", f"train.epochs={epochs}",
           "--set", "registry.enabled=false", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"modelworks run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = Path(summary["run_dir"])
    last = json.loads((run_dir / f"checkpoint_epoch={epochs}" / "metrics.json").read_text())
    shutil.rmtree(home)
    rates = [h["samples_per_s"] for h in last["history"]]
    samples = sum(h["train_samples"] for h in last["history"])
    return {"rates": rates, "wall_s": wall, "end_to_end_samples_per_s": samples / wall,
            "test_accuracy": summary["test_accuracy"]}


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MODELWORKS_DATA_DIR", str(REPO.parent / "shared/data")))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench/results/train_throughput.json"))
    args = p.parse_args()
    mnist = Path(args.data_dir) / "mnist"
    if not mnist.is_dir():
        raise SystemExit(f"MNIST not found under {args.data_dir}; pass --data-dir")

    results: dict = {"epochs": args.epochs, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    rates = bench_seed(mnist, args.epochs)
    results["seed"] = {"rates": rates, "samples_per_s": steady(rates)}
    print(f"     seed: {steady(rates):9.0f} samples/s   per epoch {[round(r) for r in rates]}", flush=True)
    # The ceiling is the faster of 1 thread and torch's default: for a model this small, a second
    # intra-op thread can cost more than it gives.
    default_threads, best = torch.get_num_threads(), None
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        rates = bench_inmemory(mnist, args.epochs)
        print(f" inmemory: {steady(rates):9.0f} samples/s   per epoch {[round(r) for r in rates]} "
              f"({threads} thread(s))", flush=True)
        if best is None or steady(rates) > best["samples_per_s"]:
            best = {"rates": rates, "samples_per_s": steady(rates), "threads": threads}
    torch.set_num_threads(default_threads)
    results["inmemory"] = best
    for workers in (1, 2):
        r = bench_modelworks(Path(args.data_dir), args.epochs, workers)
        r["samples_per_s"] = steady(r["rates"])
        results[f"mw{workers}"] = r
        print(f"      mw{workers}: {r['samples_per_s']:9.0f} samples/s   per epoch {[round(x) for x in r['rates']]}"
              f"   whole run {r['wall_s']:.1f} s ({r['end_to_end_samples_per_s']:.0f} samples/s incl. Ray start, "
              f"ingest, checkpoints, evaluation)", flush=True)
    seed, ceiling = results["seed"]["samples_per_s"], results["inmemory"]["samples_per_s"]
    results["ratios"] = {
        f"mw{w}_vs_{base}": results[f"mw{w}"]["samples_per_s"] / ref
        for w in (1, 2) for base, ref in (("seed", seed), ("inmemory", ceiling))
    }
    results["ratios"]["inmemory_vs_seed"] = ceiling / seed
    for k, v in results["ratios"].items():
        print(f"{k:>20}: {v:.2f}x")
    print("targets: mw1_vs_seed >= 1.0, mw1_vs_inmemory >= 0.6")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
