"""Where the seconds of a whole run go, for digits and MNIST, next to a plain PyTorch script doing the same job.

For each workflow, in one invocation on one machine:
  plain     one process, no Ray: read the data, standardise, train the same MLP with the same settings,
            score the test split (``python bench/overhead.py --plain WORKFLOW`` runs just this part)
  private   ``modelworks run WORKFLOW`` starting its own Ray (what a first run on a laptop does)
  joined    the same, joining a Ray already running on the machine (``ray start --head`` once, before): first
            "joined, first" (the first run after `ray start`, which also starts the cluster's long-lived actors
            and shares the cores with Ray's own start), then --repeat later runs of each workflow, alternating,
            in one shared MODELWORKS_HOME with every step rerun ("joined": the median of those by time to
            summary; all of them under "joined, every run"). "private" and "joined, first" each get a fresh home

Two figures per run, measured from outside: process start to its summary (the last line of its stdout, the
``--json`` summary; what issue 10's targets count) and process start to exit (adds Ray's disconnect and the
interpreter's exit, ~0.5 s). modelworks' own breakdown (imports, config and exit, Ray start, ingest, preprocess,
train, of which Ray Train start to the loop's first step, evaluate, register) comes from that summary.
Written to bench/results/overhead.json. On a shared 2-core machine one run varies by +-1.5 s.

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
import threading
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
def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Runs ``cmd``; returns (seconds to exit, seconds to its last line of stdout, stdout). With ``--json`` that
    last line is the run's summary: the issue's "process start to summary" is the second figure; the first
    adds what the process does after it (Ray's disconnect, the interpreter's exit)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)  # a full pipe would block it
    drain.start()
    lines, last_line_at = [], None
    for line in proc.stdout:
        lines.append(line)
        last_line_at = time.perf_counter() - t0
    proc.wait()
    wall = time.perf_counter() - t0
    drain.join()
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{''.join(err)[-3000:]}")
    return wall, last_line_at if last_line_at is not None else wall, out


def modelworks_run(workflow: str, data_dir: str, join: bool, home: Path | None = None, name: str | None = None) -> dict:
    """One `modelworks run`. Without ``home``: a fresh MODELWORKS_HOME (a first run on a machine: MLflow creates
    its database, ~2 s of CPU). With one: that home, run ``name`` with every step rerun (--no-cache), as a later
    run of someone who trains all day finds it (the database there, earlier runs' models in the registry)."""
    fresh = home is None
    home = Path(tempfile.mkdtemp()) if fresh else home
    env = {**os.environ, "MODELWORKS_HOME": str(home), "MODELWORKS_JOIN_RAY": "1" if join else "0"}
    later = ["--no-cache", "--name", name] if name else []
    try:
        wall, to_summary, out = timed([sys.executable, "-m", "modelworks.cli", "run", str(WORKFLOWS[workflow]),
                                       "--data-dir", data_dir, "--json", *later], env)
    finally:
        if fresh:
            shutil.rmtree(home, ignore_errors=True)
    summary = json.loads(out.strip().splitlines()[-1])
    steps = summary["step_seconds"]
    return {"wall_s": wall, "to_summary_s": to_summary, "test_accuracy": summary["test_accuracy"],
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
    p.add_argument("--repeat", type=int, default=3, help="later joined runs of each workflow; the median is shown")
    p.add_argument("--out", default=str(REPO / "bench/results/overhead.json"))
    args = p.parse_args()
    if args.plain:
        print(json.dumps(plain(args.plain, args.data_dir)))
        return
    names = args.workflows.split(",")
    results: dict = {"cpus": os.cpu_count(), "workflows": {}}
    for name in names:
        wall, _, out = timed([sys.executable, __file__, "--plain", name, "--data-dir", args.data_dir], dict(os.environ))
        base = {"wall_s": wall, **json.loads(out.strip().splitlines()[-1])}
        results["workflows"][name] = {"plain": base, "private": modelworks_run(name, args.data_dir, join=False)}
    start_ray()
    later, home = {name: [] for name in names}, Path(tempfile.mkdtemp())  # the later runs' one home
    try:
        for name in names:
            results["workflows"][name]["joined, first"] = modelworks_run(name, args.data_dir, join=True)
        for _ in range(args.repeat):  # alternating workflows: a slow spell of a shared machine weighs on both
            for name in names:
                later[name].append(modelworks_run(name, args.data_dir, join=True, home=home,
                                                  name=f"{name}-later-{len(later[name]) + 1}"))
        for name, runs in later.items():  # the median run by time to summary, and every run besides
            results["workflows"][name]["joined"] = sorted(runs, key=lambda r: r["to_summary_s"])[len(runs) // 2]
            results["workflows"][name]["joined, every run"] = runs
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    for name, r in results["workflows"].items():
        plain_s, private, joined = r["plain"]["wall_s"], r["private"], r["joined"]
        every = ", ".join(f"{run['to_summary_s']:.1f}" for run in r["joined, every run"])
        print(f"{name}: plain PyTorch {plain_s:.1f} s (test acc {r['plain']['test_accuracy']:.4f})")
        print(f"    modelworks, process start to summary (to exit): starting Ray {private['to_summary_s']:.1f} s "
              f"({private['wall_s']:.1f}); joining a running Ray {joined['to_summary_s']:.1f} s ({joined['wall_s']:.1f}), "
              f"the median of {every}; the first run after `ray start` {r['joined, first']['to_summary_s']:.1f} s; "
              f"test acc {joined['test_accuracy']:.4f}; to exit {joined['wall_s'] / plain_s:.2f}x plain joined, "
              f"{private['wall_s'] / plain_s:.2f}x starting Ray")
        for mode in ("private", "joined, first", "joined"):
            parts = "  ".join(f"{k} {v:.1f}" for k, v in r[mode]["breakdown_s"].items() if v is not None)
            print(f"    {mode:>13}: {parts}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
