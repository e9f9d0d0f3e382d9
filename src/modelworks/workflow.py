"""The step runner: ingest -> preprocess -> train -> evaluate -> register.

One typed function, ``run_workflow``, that the CLI and the tests both call.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import ray

from modelworks import registry as registry_mod
from modelworks import train
from modelworks.config import WorkflowConfig
from modelworks.data import preprocess, sources
from modelworks.errors import UserError
from modelworks.evaluate import evaluate_checkpoint
from modelworks.serve import apply_serve_env


@dataclass
class RunResult:
    run: str
    run_dir: str
    checkpoint: str
    val_accuracy: float
    test_accuracy: float
    model: str          # name@version
    report: str
    production: bool    # whether this version now holds the `production` alias
    seconds: float


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster given by RAY_ADDRESS (ray job submit sets it), else start a private local one.

    address="local" never joins a stale cluster left in /tmp/ray by a killed process (see ray-notes.md).
    """
    if ray.is_initialized():
        return
    # Train V2's controller picks up each epoch's report on its poll; the 2 s default adds ~2 s per epoch.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # A workflow that deploys its model (`run --serve`) gets Serve's fast ingress (see modelworks/serve).
    apply_serve_env(local=not os.environ.get("RAY_ADDRESS"))
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("MODELWORKS_PROGRESS", "1") == "1"


def runs_root() -> Path:
    return registry_mod.home() / "runs"


def default_run_name(cfg: WorkflowConfig) -> str:
    """Deterministic, so rerunning the same command resumes the same run."""
    return f"{cfg.name}-{cfg.digest()}"


def _claim_run_dir(run_dir: Path, cfg: WorkflowConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "workflow_config.json"
    current = cfg.model_dump(mode="json")
    if saved.is_file() and json.loads(saved.read_text()) != current:
        raise UserError(f"run '{run_dir.name}' exists with a different config ({saved}); "
                        f"pick another --name or rerun with the same settings to resume it")
    saved.write_text(json.dumps(current, indent=2))


def _gate(reg: registry_mod.Registry, name: str, version: int, cfg: WorkflowConfig, test_acc: float) -> bool:
    """Move `production` only when the new version passes the workflow's quality gate."""
    if test_acc < cfg.registry.min_accuracy:
        return False
    prod = reg.aliases(name).get("production")
    if prod is not None and prod != version:
        prod_acc = reg.info(name, prod).get("test_accuracy", 0.0)
        if test_acc < prod_acc + cfg.registry.gate_margin:
            return False
    reg.set_alias(name, "production", version)
    return True


def register_result(cfg: WorkflowConfig, run_name: str, ckpt: Path, eval_dir: Path, metrics: dict,
                    extra_meta: dict | None = None) -> tuple[str, int, bool]:
    reg = registry_mod.Registry()
    name = cfg.registry.model_name or cfg.name
    # Rerunning a finished run must not mint a duplicate version of the same checkpoint.
    for v in reversed(reg.versions(name)):
        meta = reg.info(name, v)
        if meta.get("run") == run_name and meta.get("checkpoint") == ckpt.name:
            return name, v, "production" in meta["aliases"]
    meta = {"run": run_name, "checkpoint": ckpt.name, "test_accuracy": metrics["test_accuracy"],
            "val_accuracy": json.loads((ckpt / "metrics.json").read_text())["val_accuracy"],
            "config_digest": cfg.digest(), **(extra_meta or {})}
    version = reg.register(name, ckpt, artifacts=eval_dir, meta=meta)
    return name, version, _gate(reg, name, version, cfg, metrics["test_accuracy"])


def run_workflow(cfg: WorkflowConfig, *, run_name: str | None = None, data_dir: str | None = None,
                 log: Callable[[str], None] = print) -> RunResult:
    if cfg.search.enabled:  # hyperparameter search first; the best trial is what gets evaluated/registered
        from modelworks import tune

        return tune.run_workflow_search(cfg, run_name=run_name, data_dir=data_dir, log=log)
    t0 = time.time()
    ensure_ray()
    run_name = run_name or default_run_name(cfg)
    run_dir = runs_root() / run_name
    _claim_run_dir(run_dir, cfg)

    log(f"[1/5] ingest: {cfg.data.source} '{cfg.data.name}'")
    src = sources.load_source(cfg.data, data_dir)
    log("[2/5] preprocess: fitting on the training split")
    pre = preprocess.fit(src.splits["train"], src.class_names, src.image_shape)
    log(f"      input {pre.input_shape}, {pre.num_classes} classes, mean={pre.mean:.4f} std={pre.std:.4f}")
    datasets = {s: pre.apply(src.splits[s]) for s in ("train", "val")}

    log(f"[3/5] train: {cfg.train.workers} worker(s), {cfg.train.epochs} epochs, run '{run_name}'")
    train.fit(cfg, datasets, pre, runs_root(), run_name, log=log)
    best = train.best_checkpoint(run_dir, cfg.evaluate.metric)

    log(f"[4/5] evaluate: {best.name} on the test split")
    eval_dir = run_dir / "evaluation"
    metrics = evaluate_checkpoint(best, src.splits["test"], eval_dir, run_name)
    log(f"      test accuracy {metrics['test_accuracy']:.4f} ({metrics['test_samples']} samples)")

    model_ref, production = "", False
    if cfg.registry.enabled:
        name, version, production = register_result(cfg, run_name, best, eval_dir, metrics)
        model_ref = f"{name}@{version}"
        log(f"[5/5] register: {model_ref}" + (" (production)" if production else ""))
    val_acc = json.loads((best / "metrics.json").read_text())["val_accuracy"]
    return RunResult(run_name, str(run_dir), str(best), val_acc, metrics["test_accuracy"], model_ref,
                     str(eval_dir / "report.md"), production, round(time.time() - t0, 1))


def result_json(result: RunResult) -> str:
    return json.dumps(asdict(result))
