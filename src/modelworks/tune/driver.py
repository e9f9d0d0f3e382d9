"""The `search` step: plan the trials, run them with Ray Tune (ASHA on ``epoch``), and take the best trial's
best checkpoint (by validation accuracy, never test). The workflow runner then evaluates and registers it
with the same steps as after `train` (pipeline/model_steps.py); this module never imports the runner.

CPUs are budgeted from ``ray.cluster_resources()`` minus ``train.DATA_CPUS`` (``plan``); a trial that can never
fit fails before anything starts. The preprocessed splits are shared by every trial. Results:
``trials.csv``/``trials.json``/``trials_val_accuracy.png`` in the search directory (and, through the
evaluate step, with the registered version).
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
from modelworks.tune.space import max_epochs, param_space

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


@dataclass
class SearchOutcome:
    rows: list[dict]        # the trial table (TRIAL_TABLE_COLUMNS, config, history, path)
    best_row: dict
    best_checkpoint: Path
    epochs_total: int
    plan: str


def search_trials(cfg: WorkflowConfig, pre, datasets: dict, search_dir: Path, *, resume: bool | None = None,
                  log: Callable[[str], None] = print) -> SearchOutcome:
    """The `search` step: run (or resume) the workflow's trials with Ray Tune in ``search_dir`` and pick the
    best checkpoint by validation accuracy. ``datasets`` are the preprocess step's train and val splits
    (arrays or Ray Datasets); evaluation and registration are the next steps' job, as after `train`.

    resume: True continues an interrupted search, False refuses to touch an existing one, None (the
    `modelworks run` behaviour: same name = resume) continues when one exists.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from modelworks.data.sources import arrays_dataset
    from modelworks.console import Console
    from modelworks.runtime import ray_is_local
    from modelworks.tune import events, state
    from modelworks.tune.trial import ModelworksTrial

    if not cfg.search.space:
        raise UserError("search.space is empty: declare at least one dimension, e.g. "
                        "--set 'search.space.lr={\"loguniform\": [1e-4, 1e-2]}'")
    name, root = search_dir.name, search_dir.parent
    epochs_max = max_epochs(cfg)
    # Save Tune's experiment state after every step, so a killed driver loses no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    exists = tune.Tuner.can_restore(str(search_dir))
    if exists and resume is False:  # check_search says so before any data is read; this is the last guard
        raise UserError(f"search '{name}' already exists ({search_dir}); pass --resume to continue it")
    # Every trial iterates in-memory blocks of the same preprocessed splits.
    datasets = {s: (arrays_dataset(d) if isinstance(d, dict) else d).materialize() for s, d in datasets.items()}
    # Now that the data's size is known, cap the concurrency by memory too (every trial caches its shard).
    data_bytes = sum(int(d.size_bytes() or 0) for d in datasets.values())
    plan = plan_trials(cfg, local=ray_is_local())
    plan = plan_trials(cfg, local=ray_is_local(), trial_bytes=trial_memory_bytes(plan.workers, data_bytes))
    log(f"      {cfg.search.num_samples} trials x up to {epochs_max} epochs, {cfg.search.scheduler.upper()}, "
        f"{plan.describe()}" + (" (resuming)" if exists else ""))
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
                search_alg=BasicVariantGenerator(random_state=cfg.search.random_seed, max_concurrent=plan.concurrency),
                reuse_actors=False,
                trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(
                name=name, storage_path=str(root),
                stop={"epoch": epochs_max},
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[state.StateMirror(str(search_dir)),
                           events.TrialEvents(epochs_max, metric, cfg.search.scheduler)],
                verbose=0,
            ),
        )
    with Console.from_log(log).trials(cfg.search.num_samples, epochs_max, cfg.evaluate.metric) as view:
        events.attach(view)
        try:
            grid = tuner.fit()
        finally:
            events.attach(None)

    rows = _trial_table(list(grid), search_dir, epochs_max)
    write_outputs(rows, search_dir, f"{name}: validation accuracy per trial")
    for r in rows:
        log(f"      {r['trial_id']}: {r['status']:<9} {r['epochs']:>2} epochs  best val {r['best_val_accuracy']:.4f}"
            f"  {json.dumps(r['config'])}")
    best_row, best_ckpt = _best_checkpoint(rows)
    return SearchOutcome(rows, best_row, best_ckpt, sum(r["epochs"] for r in rows), plan.describe())


def check_search(cfg: WorkflowConfig, search_dir: Path, resume: bool | None, *, before_ray: bool) -> None:
    """Fail before any data is read: a search that exists when the caller said not to resume it (before Ray
    starts), or a trial that can never fit on this cluster (once Ray is up)."""
    if before_ray:
        from ray import tune

        from modelworks import storage

        if storage.remote_root():
            raise UserError(f"a search keeps its trials' checkpoints on a path every node sees, not yet on object "
                            f"storage ({storage.ENV}={storage.remote_root()}): give the profile a shared mount "
                            f"(e.g. /mnt/efs/modelworks) as storage, or train without search")
        if resume is False and tune.Tuner.can_restore(str(search_dir)):
            raise UserError(f"search '{search_dir.name}' already exists ({search_dir}); pass --resume to continue "
                            f"it (finished trials are kept) or --name to start another")
    else:
        from modelworks.runtime import ray_is_local

        plan_trials(cfg, local=ray_is_local())


def search_meta(cfg: WorkflowConfig, name: str, outcome: SearchOutcome) -> dict:
    """What the registry keeps about the search that found a version."""
    best = outcome.best_row
    return {"search": {"name": name,
                       "space": cfg.search.space, "num_samples": cfg.search.num_samples,
                       "scheduler": cfg.search.scheduler, "max_epochs": max_epochs(cfg),
                       "best_trial": best["trial_id"], "best_params": best["config"],
                       "epochs_total": outcome.epochs_total},
            "trials": [{c: r[c] for c in TRIAL_TABLE_COLUMNS} | {"config": r["config"]} for r in outcome.rows]}


