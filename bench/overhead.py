"""Where the seconds of a whole run go, for digits and MNIST, next to a plain PyTorch script doing the same job.

For each workflow, in one invocation on one machine:
  plain     one process, no Ray: read the data, standardise, train the same MLP with the same settings,
            score the test split (``python bench/overhead.py --plain WORKFLOW`` runs just this part)
  private   ``modelworks run WORKFLOW`` starting its own Ray (what a first run on a laptop does)
  joined    the same, joining a Ray already running on the machine (``ray start --head`` once, before): each
            workflow twice, "joined, first" (the first run after `ray start`, which also starts the cluster's
            long-lived actors and shares the cores with Ray's own start) and "joined" (every later run)

Each figure is process start to exit, measured from outside; modelworks' own breakdown (imports and
config, Ray start, ingest, preprocess, train, of which Ray Train start to the loop's first step, evaluate,
register) comes from the run's ``--json`` summary. Written to bench/results/overhead.json.

    .venv/bin/python bench/overhead.py --data-dir ../shared/data

The "joined" part runs `ray start --head` and, at the end, `ray stop --force`, which stops every Ray on the
machine: run it where no other Ray is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")  # this environment's CLI: the bench need not run from an activated venv
WORKFLOWS = {"digits": REPO / "workflows/digits.py", "mnist": REPO / "workflows/mnist.py"}


# --------------------------------------------------------------------------------- the plain baseline
def plain(workflow: str, data_dir: str) -> dict:
    """The same job without Ray or modelworks' runner: what the fixed cost is measured against."""
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from torch import nn

    from modelworks.config import load_workflow
    from modelworks.data import idx
    from modelworks.data.sources import split_codes
    from modelworks.models.mlp import MLP

    cfg = load_workflow(WORKFLOWS[workflow])
    if workflow == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.images.astype(np.float32), d.target.astype(np.int64)
        codes = split_codes(x, cfg.data.split_seed, cfg.data.val_fraction, cfg.data.test_fraction)
        xt, yt = x[codes == 2], y[codes == 2]
    else:
        folder = Path(data_dir) / "mnist"
        pairs = {s: idx.open_split(folder, "mnist", s, False) for s in ("train", "test")}
        x, y, xt, yt = (idx.read_rows(p, 0, p.dims[0]) for pair in pairs.values() for p in (pair.images, pair.labels))
        y, yt = y.astype(np.int64), yt.astype(np.int64)
        codes = split_codes(x, cfg.data.split_seed, cfg.data.val_fraction, None)
    x = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32))
    train = torch.from_numpy(codes == 0)
    mean, std = x[train].mean(), x[train].std()
    norm = lambda a: (torch.as_tensor(a.reshape(len(a), -1), dtype=torch.float32) - mean) / std  # noqa: E731
    xtr, ytr = norm(x[train].numpy()), torch.from_numpy(y)[train]
    torch.manual_seed(cfg.train.random_seed)
    model = MLP(xtr.shape[1], cfg.model.hidden_sizes, 10)
    t = cfg.train
    opt = (torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam)(model.parameters(), lr=t.lr,
                                                                               weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, t.epochs) if t.lr_schedule == "cosine" else None
    loss_fn = nn.CrossEntropyLoss()
    t_train = time.perf_counter()
    for _ in range(t.epochs):
        for i in torch.randperm(len(xtr)).split(t.batch_size):
            opt.zero_grad()
            loss_fn(model(xtr[i]), ytr[i]).backward()
            opt.step()
        if sched:
            sched.step()
    train_s = time.perf_counter() - t_train
    with torch.no_grad():
        acc = float((model(norm(xt)).argmax(1) == torch.from_numpy(yt)).float().mean())
    return {"test_accuracy": acc, "train_s": train_s, "in_process_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ the runs
def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def modelworks_run(workflow: str, data_dir: str, join: bool) -> dict:
    home = Path(tempfile.mkdtemp())
    env = {**os.environ, "MODELWORKS_HOME": str(home), "MODELWORKS_JOIN_RAY": "1" if join else "0"}
    try:
        wall, out = timed([sys.executable, "-m", "modelworks.cli", "run", str(WORKFLOWS[workflow]),
                           "--data-dir", data_dir, "--json"], env)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    summary = json.loads(out.strip().splitlines()[-1])
    steps = summary["step_seconds"]
    return {"wall_s": wall, "test_accuracy": summary["test_accuracy"],
            "breakdown_s": {"imports, config, exit": wall - summary["seconds"], **steps,
                            "of train: Ray Train start to first step": summary["trainer_startup_s"].get("train")}}


def start_ray() -> None:
    subprocess.run([RAY, "stop", "--force"], capture_output=True)
    subprocess.run([RAY, "start", "--head", f"--num-cpus={os.cpu_count()}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True,
                   env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MODELWORKS_DATA_DIR", str(REPO.parent / "shared/data")))
    p.add_argument("--workflows", default="digits,mnist")
    p.add_argument("--plain", metavar="WORKFLOW", help="run only the plain baseline in this process (JSON out)")
    p.add_argument("--out", default=str(REPO / "bench/results/overhead.json"))
    args = p.parse_args()
    if args.plain:
        print(json.dumps(plain(args.plain, args.data_dir)))
        return
    names = args.workflows.split(",")
    results: dict = {"cpus": os.cpu_count(), "workflows": {}}
    for name in names:
        wall, out = timed([sys.executable, __file__, "--plain", name, "--data-dir", args.data_dir], dict(os.environ))
        base = {"wall_s": wall, **json.loads(out.strip().splitlines()[-1])}
        results["workflows"][name] = {"plain": base, "private": modelworks_run(name, args.data_dir, join=False)}
    start_ray()
    try:
        for name in names:
            results["workflows"][name]["joined, first"] = modelworks_run(name, args.data_dir, join=True)
        for name in names:
            results["workflows"][name]["joined"] = modelworks_run(name, args.data_dir, join=True)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
    for name, r in results["workflows"].items():
        print(f"{name}: plain PyTorch {r['plain']['wall_s']:.1f} s (test acc {r['plain']['test_accuracy']:.4f}); "
              f"modelworks {r['private']['wall_s']:.1f} s starting Ray, {r['joined']['wall_s']:.1f} s joining a "
              f"running Ray ({r['joined, first']['wall_s']:.1f} s the first time; "
              f"test acc {r['joined']['test_accuracy']:.4f}); "
              f"ratio {r['joined']['wall_s'] / r['plain']['wall_s']:.2f}x / {r['private']['wall_s'] / r['plain']['wall_s']:.2f}x")
        for mode in ("private", "joined, first", "joined"):
            parts = "  ".join(f"{k} {v:.1f}" for k, v in r[mode]["breakdown_s"].items() if v is not None)
            print(f"    {mode:>13}: {parts}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
