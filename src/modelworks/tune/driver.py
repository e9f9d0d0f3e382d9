"""The search driver: plan the trials, run them with Ray Tune (ASHA on ``epoch``), then take the best trial's
best checkpoint (by validation accuracy, never test) through evaluate and register, as a plain run does.

CPUs are budgeted from ``ray.cluster_resources()`` minus ``train.DATA_CPUS`` (``plan``); a trial that can never
fit fails before anything starts. The data is read and preprocessed once and shared by every trial. Results:
``trials.csv``/``trials.json``/``trials_val_accuracy.png`` in the search directory and with the registered
version. The driver uses the same step functions as the workflow runner (``steps``) and never imports it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from modelworks.config import WorkflowConfig
from modelworks.errors import UserError
from modelworks.tune.pacing import attempts_path, read_attempts, reported_epoch
from modelworks.tune.plan import DRIVER_CPUS, plan_trials, trial_memory_bytes
from modelworks.tune.space import max_epochs, param_space, search_name, trial_config

TRIAL_TABLE_COLUMNS = ("trial_id", "status", "epochs", "best_val_accuracy", "best_epoch", "last_val_accuracy",
                       "attempts", "seconds", "started_at", "ended_at")


@dataclass
class SearchResult:
    search: str
    search_dir: str
    trials: list[dict]
    best_trial: str
    best_params: dict
    best_checkpoint: str
    val_accuracy: float
    test_accuracy: float
    epochs_total: int
    model: str
    production: bool
    report: str
    plan: str
    seconds: float
    run: str = ""
    extra: dict = field(default_factory=dict)


def _trial_table(results, search_dir: Path, epochs_max: int) -> list[dict]:
    rows = []
    for r in results:
        trial_id = r.metrics.get("trial_id") if r.metrics else None
        trial_id = trial_id or Path(r.path).name
        events = read_attempts(attempts_path(search_dir, trial_id))
        # The history comes from the newest checkpoint the trial reported, which it wrote itself; Tune's
        # progress log, copied in the background, may miss epochs after a killed driver.
        saved = trial_checkpoints(Path(r.path), upto=reported_epoch(events))
        df = r.metrics_dataframe
        history = []
        if saved:
            newest = json.loads((saved[-1][1] / "metrics.json").read_text())
            history = [(int(h["epoch"]), float(h["val_accuracy"])) for h in newest.get("history", [])]
        elif df is not None and {"epoch", "val_accuracy"} <= set(df.columns):
            history = [(int(e), float(a)) for e, a in zip(df["epoch"], df["val_accuracy"])]
        epochs = max((e for e, _ in history), default=0)
        best_e, best_a = max(history, key=lambda t: (t[1], -t[0])) if history else (0, float("nan"))
        status = "error" if r.error else ("completed" if epochs >= epochs_max else "stopped")
        rows.append({
            "trial_id": trial_id, "status": status, "epochs": epochs,
            "best_val_accuracy": best_a, "best_epoch": best_e,
            "last_val_accuracy": history[-1][1] if history else float("nan"),
            "attempts": sum(1 for e in events if e["event"] == "start"),
            # Unix times the trial's first attempt started and its last one ended: concurrent trials overlap.
            "started_at": min((e["time"] for e in events if e["event"] == "start"), default=None),
            "ended_at": max((e["time"] for e in events if e["event"] in ("end", "epoch")), default=None),
            "seconds": round(float(r.metrics.get("time_total_s", 0.0)) if r.metrics else 0.0, 1),
            "config": {k: (v.item() if hasattr(v, "item") else v) for k, v in (r.config or {}).items()},
            "history": history, "path": r.path,
        })
    return sorted(rows, key=lambda x: x["trial_id"])


def trial_checkpoints(trial_dir: Path, upto: int | None = None) -> list[tuple[int, Path]]:
    """A trial's complete epoch checkpoints by epoch: beside its Tune files (1 worker) or in its Train run
    (N workers). `upto`: only epochs reported to Tune (a Train run stopped by ASHA may have written more)."""
    from modelworks.train import list_checkpoints

    found = list_checkpoints(trial_dir) + list_checkpoints(trial_dir.parent / "train" / trial_dir.name)
    return sorted(c for c in found if upto is None or c[0] <= upto)


def _best_checkpoint(rows: list[dict]) -> tuple[dict, Path]:
    """The best epoch checkpoint over all trials by validation accuracy (then lower val loss, earlier epoch)."""
    scored = []
    for row in rows:
        for _, ckpt in trial_checkpoints(Path(row["path"]), upto=row["epochs"]):
            m = json.loads((ckpt / "metrics.json").read_text())
            scored.append((m["val_accuracy"], -m["val_loss"], -m["epoch"], row["trial_id"], ckpt))
    if not scored:
        raise UserError("the search finished without any checkpoint (every trial failed?); see the trial table")
    best = max(scored, key=lambda t: t[:4])
    return next(r for r in rows if r["trial_id"] == best[3]), best[4]


def write_outputs(rows: list[dict], out: Path, title: str) -> None:
    """trials.csv, trials.json and trials_val_accuracy.png in `out`."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r["config"]})
    with (out / "trials.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(TRIAL_TABLE_COLUMNS) + [f"config.{k}" for k in keys])
        for r in rows:
            w.writerow([r[c] for c in TRIAL_TABLE_COLUMNS] + [json.dumps(r["config"].get(k)) for k in keys])
    (out / "trials.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "path"} for r in rows],
                                                indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["history"]:
            ax.plot([e for e, _ in r["history"]], [a for _, a in r["history"]], marker="o", markersize=3,
                    label=f"{r['trial_id']} ({r['status']})")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "trials_val_accuracy.png", dpi=100)
    plt.close(fig)


def run_search(cfg: WorkflowConfig, *, name: str | None = None, data_dir: str | None = None,
               resume: bool | None = None, register: bool = True,
               log: Callable[[str], None] = print) -> SearchResult:
    """Run (or resume) the workflow's search, evaluate the best trial on test, register it through the gate.

    resume: True continues an interrupted search, False refuses to touch an existing one, None (the
    `modelworks run` behaviour: same name = resume) continues when one exists.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from modelworks import runtime, steps
    from modelworks.data import sources
    from modelworks.evaluate import evaluate_checkpoint
    from modelworks.tune import state
    from modelworks.tune.trial import ModelworksTrial

    t0 = time.time()
    if not cfg.search.space:
        raise UserError("search.space is empty: declare at least one dimension, e.g. "
                        "--set 'search.space.lr={\"loguniform\": [1e-4, 1e-2]}'")
    runtime.ensure_ray()
    name = name or search_name(cfg)
    root = runtime.runs_root()
    search_dir = root / name
    epochs_max = max_epochs(cfg)
    plan = plan_trials(cfg, local=_ray_is_local())  # fails fast, before any data is read
    # Save Tune's experiment state after every step, so a killed driver loses no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")

    exists = tune.Tuner.can_restore(str(search_dir))
    if exists and resume is False:
        raise UserError(f"search '{name}' already exists ({search_dir}); pass --resume to continue it "
                        f"(finished trials are kept) or --name to start another")
    saved = search_dir / "workflow_config.json"
    if exists and saved.is_file() and json.loads(saved.read_text()) != cfg.model_dump(mode="json"):
        raise UserError(f"search '{name}' exists with a different config ({saved}); use --name for a new one")

    log(f"[1/5] ingest: {cfg.data.source} '{cfg.data.name}'")
    src = sources.load_source(cfg.data, data_dir)
    log("[2/5] preprocess: fitting on the training split")
    pre = steps.fit_preprocessor(cfg, src, log)
    # Read and preprocess once for every trial: the trials iterate in-memory blocks.
    datasets = {s: pre.apply(src.splits[s]).materialize() for s in ("train", "val")}
    # Now that the data's size is known, cap the concurrency by memory too (every trial caches its shard).
    data_bytes = sum(int(d.size_bytes() or 0) for d in datasets.values())
    plan = plan_trials(cfg, local=_ray_is_local(), trial_bytes=trial_memory_bytes(plan.workers, data_bytes))

    log(f"[3/5] search '{name}': {cfg.search.num_samples} trials x up to {epochs_max} epochs, "
        f"{cfg.search.scheduler.upper()}, {plan.describe()}" + (" (resuming)" if exists and resume is not False else ""))
    search_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    trainable = tune.with_resources(
        tune.with_parameters(ModelworksTrial, base=cfg.model_dump(mode="json"), pre_json=pre.to_json(),
                             datasets=datasets, plan=asdict(plan), search_dir=str(search_dir),
                             session=f"{os.getpid()}-{time.time():.3f}"),
        {"cpu": plan.trial_cpus if plan.workers == 1 else DRIVER_CPUS})
    if exists:
        state.restore_mirror(search_dir)  # Tune's own copy may be torn by the kill; ours is whole
        tuner = tune.Tuner.restore(str(search_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        metric = cfg.evaluate.metric
        if cfg.search.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="epoch", metric=metric, mode="max", max_t=epochs_max,
                                      grace_period=min(cfg.search.grace_period, epochs_max),
                                      reduction_factor=cfg.search.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                num_samples=cfg.search.num_samples, scheduler=scheduler,
                # The concurrency limit lives in the generator (Tune ignores max_concurrent_trials with it).
                search_alg=BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=plan.concurrency),
                reuse_actors=False,
                trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(
                name=name, storage_path=str(root),
                stop={"epoch": epochs_max},
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[state.StateMirror(str(search_dir))],
                verbose=0,
            ),
        )
    grid = tuner.fit()

    rows = _trial_table(list(grid), search_dir, epochs_max)
    write_outputs(rows, search_dir, f"{name}: validation accuracy per trial")
    for r in rows:
        log(f"      {r['trial_id']}: {r['status']:<9} {r['epochs']:>2} epochs  best val {r['best_val_accuracy']:.4f}"
            f"  {json.dumps(r['config'])}")
    best_row, best_ckpt = _best_checkpoint(rows)
    epochs_total = sum(r["epochs"] for r in rows)
    log(f"      best trial {best_row['trial_id']} ({best_ckpt.name}), {epochs_total} epochs in all")

    log("[4/5] evaluate: best trial on the test split")
    eval_dir = search_dir / "evaluation"
    metrics = evaluate_checkpoint(best_ckpt, src.splits["test"], eval_dir, f"{name}/{best_row['trial_id']}")
    write_outputs(rows, eval_dir, f"{name}: validation accuracy per trial")  # registered as artifacts
    log(f"      test accuracy {metrics['test_accuracy']:.4f} ({metrics['test_samples']} samples)")

    best_cfg = trial_config(cfg, best_row["config"])
    model_ref, production = "", False
    if register and cfg.registry.enabled:
        run_ref = f"{name}/{best_row['trial_id']}"
        search_meta = {"search": {"name": name, "space": cfg.search.space, "num_samples": cfg.search.num_samples,
                                  "scheduler": cfg.search.scheduler, "max_epochs": epochs_max,
                                  "best_trial": best_row["trial_id"], "best_params": best_row["config"],
                                  "epochs_total": epochs_total},
                       "trials": [{c: r[c] for c in TRIAL_TABLE_COLUMNS} | {"config": r["config"]} for r in rows]}
        mname, version, production = steps.register_result(best_cfg, run_ref, best_ckpt, eval_dir, metrics,
                                                               extra_meta=search_meta)
        model_ref = f"{mname}@{version}"
        log(f"[5/5] register: {model_ref}" + (" (production)" if production else " (production unchanged: gate)"))
    val_acc = json.loads((best_ckpt / "metrics.json").read_text())["val_accuracy"]
    return SearchResult(name, str(search_dir), [{k: v for k, v in r.items() if k not in ("history", "path")}
                                               for r in rows],
                        best_row["trial_id"], best_row["config"], str(best_ckpt), val_acc,
                        metrics["test_accuracy"], epochs_total, model_ref, production,
                        str(eval_dir / "report.md"), plan.describe(), round(time.time() - t0, 1),
                        run=f"{name}/{best_row['trial_id']}")


def _ray_is_local() -> bool:
    from modelworks.train import ray_is_local

    return ray_is_local()
