"""ASHA vs running every trial to completion, on the same sampled trials.

Runs the workflow's search twice with the same seed (so the same hyperparameters are sampled): once with
ASHA early stopping, once FIFO (every trial to max_epochs). Prints, side by side: total epochs consumed,
wall time, best validation and test accuracy, the ratios, and each trial's epochs under both. Target: ASHA
<= 0.4x the epochs, best test accuracy within 0.2 points.

Fair by construction: both searches run on the same Ray cluster (started before either is timed), sample the
same trials (checked: `same_trials`) and get the same plan (concurrency, CPU shares, threads: checked,
`same_plan`); only the scheduler differs. Wall times are sensitive to other load on the machine.

    .venv/bin/python bench/tune_efficiency.py                         # digits, 8 trials x 20 epochs
    .venv/bin/python bench/tune_efficiency.py --workflow workflows/mnist.py --data-dir /work/shared/data
                                                                      # MNIST, 8 trials x 10 epochs (~10 min on 2 cores)
    .venv/bin/python bench/tune_efficiency.py --set search.num_samples=6 --json
    .venv/bin/python bench/tune_efficiency.py --set search.max_concurrent=1   # trials one after another
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow_pos", nargs="?", metavar="WORKFLOW", help="same as --workflow")
    p.add_argument("--workflow", default=None, help="workflow file (default: workflows/digits.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    p.add_argument("--verbose", action="store_true", help="show the searches' own progress")
    args = p.parse_args(argv)
    args.workflow = args.workflow or args.workflow_pos or str(REPO / "workflows" / "digits.py")
    if args.data_dir:
        os.environ["MODELWORKS_DATA_DIR"] = args.data_dir

    # A private home: the bench never touches the user's runs or registry.
    os.environ["MODELWORKS_HOME"] = tempfile.mkdtemp(prefix="mw-bench-tune-")
    os.environ.setdefault("MODELWORKS_PROGRESS", "0")
    from modelworks.config import apply_overrides, load_workflow
    from modelworks.tune.cli import run_search
    from modelworks.workflow import ensure_ray

    base = apply_overrides(load_workflow(args.workflow), ["search.enabled=true", *args.set])
    ensure_ray()  # start Ray before timing either search
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else (lambda m: None)
    out = {}
    for mode in ("asha", "fifo"):
        cfg = apply_overrides(base, [f"search.scheduler={mode}"])
        t0 = time.time()
        r = run_search(cfg, name=f"bench-{mode}", data_dir=args.data_dir, register=False, log=log)
        out[mode] = {"epochs": r.epochs_total, "wall_s": round(time.time() - t0, 1),
                     "best_val_accuracy": r.val_accuracy, "best_test_accuracy": r.test_accuracy,
                     "best_trial_params": r.best_params, "plan": r.plan,
                     "trials": [(json.dumps(t["config"], sort_keys=True), t["epochs"], t["status"],
                                 t["best_val_accuracy"]) for t in r.trials]}
        print(f"{mode}: {r.epochs_total} epochs, {out[mode]['wall_s']:.0f} s, best test {r.test_accuracy:.4f}; "
              f"{r.plan}", file=sys.stderr, flush=True)

    same = sorted(t[0] for t in out["asha"]["trials"]) == sorted(t[0] for t in out["fifo"]["trials"])
    a, f = out["asha"], out["fifo"]
    same_plan = a["plan"] == f["plan"]
    full = {t[0]: t for t in f["trials"]}
    print(f"\n{'trial config':<60}{'ASHA epochs':>12}{'best val':>10}{'full: best val':>16}")
    for cfg_json, epochs, status, best_val in sorted(a["trials"], key=lambda t: -full.get(t[0], t)[3]):
        short = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                          for k, v in json.loads(cfg_json).items())
        print(f"{short[:58]:<60}{epochs:>12}{best_val:>10.4f}{full.get(cfg_json, (0, 0, 0, float('nan')))[3]:>16.4f}")
    summary = {
        "workflow": Path(args.workflow).name, "num_trials": len(a["trials"]), "same_trials": same,
        "same_plan": same_plan, "plan": a["plan"],
        "epochs_asha": a["epochs"], "epochs_full": f["epochs"], "epochs_ratio": round(a["epochs"] / f["epochs"], 3),
        "wall_asha_s": a["wall_s"], "wall_full_s": f["wall_s"], "wall_ratio": round(a["wall_s"] / f["wall_s"], 3),
        "best_test_asha": a["best_test_accuracy"], "best_test_full": f["best_test_accuracy"],
        "best_val_asha": a["best_val_accuracy"], "best_val_full": f["best_val_accuracy"],
        "test_gap_points": round(100 * (f["best_test_accuracy"] - a["best_test_accuracy"]), 2),
    }
    summary["targets_met"] = summary["epochs_ratio"] <= 0.4 and summary["test_gap_points"] <= 0.2
    print(f"\n{'':24}{'ASHA':>12}{'to completion':>16}{'ratio':>10}")
    print(f"{'epochs consumed':24}{a['epochs']:>12}{f['epochs']:>16}{summary['epochs_ratio']:>10.3f}")
    print(f"{'wall time (s)':24}{a['wall_s']:>12.0f}{f['wall_s']:>16.0f}{summary['wall_ratio']:>10.3f}")
    print(f"{'best val accuracy':24}{a['best_val_accuracy']:>12.4f}{f['best_val_accuracy']:>16.4f}")
    print(f"{'best test accuracy':24}{a['best_test_accuracy']:>12.4f}{f['best_test_accuracy']:>16.4f}"
          f"{summary['test_gap_points']:>+9.2f}pt")
    print(f"plan: {a['plan']}" + ("" if same_plan else f" (to completion: {f['plan']})"))
    print(f"same sampled trials: {same}; same plan: {same_plan}; targets (epochs <= 0.4x, test within 0.2 pt): "
          f"{'met' if summary['targets_met'] else 'NOT met'}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
