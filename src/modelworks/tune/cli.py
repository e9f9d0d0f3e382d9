"""``modelworks tune WORKFLOW``: the workflow with its `search` step (``modelworks run`` runs the same graph
when ``search.enabled``), and ``run_search``, the same from Python."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from typing import Callable

from modelworks.config import WorkflowConfig, apply_overrides
from modelworks.tune.driver import TRIAL_TABLE_COLUMNS, SearchResult


def run_search(cfg: WorkflowConfig, *, name: str | None = None, data_dir: str | None = None,
               resume: bool | None = None, register: bool = True,
               log: Callable[[str], None] = print) -> SearchResult:
    """Run (or resume) the workflow as a graph whose `search` step picks the best trial, which `evaluate`
    and `register` then take as they take a `train` step's checkpoint.

    resume: True continues an interrupted search, False refuses to touch an existing one, None (the
    `modelworks run` behaviour: same name = resume) continues when one exists.
    """
    from modelworks.pipeline.runner import RunOptions
    from modelworks.workflow import execute

    cfg = apply_overrides(cfg, ["search.enabled=true"] + ([] if register else ["registry.enabled=false"]))
    result, ctx = execute(cfg, run_name=name, data_dir=data_dir, log=log, user_steps=[],
                          options=RunOptions(resume=resume))
    found, rows = ctx.value("search"), ctx.obj("search")
    return SearchResult(ctx.run_dir.name, str(ctx.run_dir),
                        [{c: r[c] for c in TRIAL_TABLE_COLUMNS} | {"config": r["config"]} for r in rows],
                        found["trial"], found["params"], found["checkpoint"], found["metrics"]["val_accuracy"],
                        result.test_accuracy, found["search"]["search"]["epochs_total"], result.model,
                        result.production, result.report, found["plan"], result.seconds, run=result.run)


def cmd_tune(args: argparse.Namespace) -> int:
    from modelworks.cli import report_failure, run_console
    from modelworks.config import load_workflow

    cfg = apply_overrides(load_workflow(args.workflow), ["search.enabled=true", *(args.set or [])])
    if args.data_dir:
        os.environ["MODELWORKS_DATA_DIR"] = args.data_dir
    console, out, err = run_console(args)  # as `modelworks run`'s: Ray's and Tune's output in the search's log
    try:
        result = run_search(cfg, name=args.name, data_dir=args.data_dir, resume=args.resume, log=console)
    except Exception as exc:  # noqa: BLE001 - one line on the terminal, the traceback in the search's log
        if console.log_path is None:
            raise
        return report_failure(exc, console.log_path, err)
    if args.json:
        # Ray prints deduplicated worker lines ("[repeated Nx across cluster]") with a delay; shut down first
        # so that, with --verbose, none lands after the summary, which must be the last stdout line.
        import ray

        ray.shutdown()
        print(json.dumps(asdict(result)), file=out, flush=True)
    else:
        console.summary([
            ("best trial", f"{result.best_trial}  {json.dumps(result.best_params)}"),
            ("model", f"{result.model or '(not registered)'}{'  [production]' if result.production else ''}"),
            ("test", f"accuracy {result.test_accuracy:.4f}  (val {result.val_accuracy:.4f}); "
                     f"{result.epochs_total} epochs over {len(result.trials)} trials in {result.seconds:.0f} s"),
            ("trials", str(Path(result.search_dir) / "trials.csv")),
            ("report", result.report),
        ])
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
    p.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own output live (else in the "
                                                          "search's logs/ray.log)")
    p.set_defaults(func=cmd_tune)
