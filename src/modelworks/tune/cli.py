"""``modelworks tune WORKFLOW``: the workflow's search on its own (``modelworks run`` runs it too when
``search.enabled``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from modelworks.tune.driver import run_search


def cmd_tune(args: argparse.Namespace) -> int:
    from modelworks.config import apply_overrides, load_workflow

    cfg = apply_overrides(load_workflow(args.workflow), ["search.enabled=true", *(args.set or [])])
    if args.data_dir:
        os.environ["MODELWORKS_DATA_DIR"] = args.data_dir
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    result = run_search(cfg, name=args.name, data_dir=args.data_dir, resume=args.resume, log=log)
    if args.json:
        # Ray prints deduplicated worker log lines ("[repeated Nx across cluster]") with a delay; shut down
        # first so none lands after the summary, which must be the last stdout line.
        import ray

        sys.stdout.flush()
        ray.shutdown()
        print(json.dumps(asdict(result)), flush=True)
    else:
        print(f"best trial: {result.best_trial}  {json.dumps(result.best_params)}")
        print(f"model:  {result.model or '(not registered)'}{'  [production]' if result.production else ''}")
        print(f"test accuracy: {result.test_accuracy:.4f}  (val {result.val_accuracy:.4f}); "
              f"{result.epochs_total} epochs over {len(result.trials)} trials in {result.seconds:.0f} s")
        print(f"trials: {Path(result.search_dir) / 'trials.csv'}")
        print(f"report: {result.report}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("tune", help="hyperparameter search (Ray Tune, ASHA); registers the best trial")
    p.add_argument("workflow", help="workflow file with a search= section, e.g. workflows/mnist.py")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. search.num_samples=4 (repeatable)")
    p.add_argument("--name", help="search name (default: workflow name + config hash)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search; finished trials are kept")
    p.add_argument("--data-dir", help="dataset folder (default: $MODELWORKS_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    p.set_defaults(func=cmd_tune)
