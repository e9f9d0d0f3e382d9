"""ASHA vs running every trial to completion, on the same sampled trials.

Runs the workflow's search twice with the same seed (so the same hyperparameters are sampled): once with
ASHA early stopping, once FIFO (every trial to max_epochs). Prints, side by side: total epochs consumed,
wall time, best validation and test accuracy, and the ratios. Target: ASHA <= 0.4x the epochs, best test
accuracy within 0.2 points.

    .venv/bin/python bench/tune_efficiency.py                         # digits, 8 trials x 20 epochs
    .venv/bin/python bench/tune_efficiency.py workflows/mnist.py      # MNIST, 8 trials x 10 epochs (long)
    .venv/bin/python bench/tune_efficiency.py --set search.num_samples=6 --json
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
    p.add_argument("workflow", nargs="?", default=str(REPO / "workflows" / "digits.py"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    p.add_argument("--verbose", action="store_true", help="show the searches' own progress")
    args = p.parse_args(argv)

    # A private home: the bench never touches the user's runs or registry.
    os.environ["MODELWORKS_HOME"] = tempfile.mkdtemp(prefix="mw-bench-tune-")
    os.environ.setdefault("MODELWORKS_PROGRESS", "0")
    from modelworks.config import apply_overrides, load_workflow
    from modelworks.tune import run_search

    base = apply_overrides(load_workflow(args.workflow), ["search.enabled=true", *args.set])
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else (lambda m: None)
    out = {}
    for mode in ("asha", "fifo"):
        cfg = apply_overrides(base, [f"search.scheduler={mode}"])
        t0 = time.time()
        r = run_search(cfg, name=f"bench-{mode}", data_dir=args.data_dir, register=False, log=log)
        out[mode] = {"epochs": r.epochs_total, "wall_s": round(time.time() - t0, 1),
                     "best_val_accuracy": r.val_accuracy, "best_test_accuracy": r.test_accuracy,
                     "best_trial_params": r.best_params,
                     "trials": [(json.dumps(t["config"], sort_keys=True), t["epochs"], t["status"]) for t in r.trials]}
        print(f"{mode}: {r.epochs_total} epochs, {out[mode]['wall_s']:.0f} s, best test {r.test_accuracy:.4f}",
              file=sys.stderr, flush=True)

    same = sorted(c for c, _, _ in out["asha"]["trials"]) == sorted(c for c, _, _ in out["fifo"]["trials"])
    a, f = out["asha"], out["fifo"]
    summary = {
        "workflow": Path(args.workflow).name, "num_trials": len(a["trials"]), "same_trials": same,
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
    print(f"same sampled trials: {same}; targets (epochs <= 0.4x, test within 0.2 pt): "
          f"{'met' if summary['targets_met'] else 'NOT met'}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
