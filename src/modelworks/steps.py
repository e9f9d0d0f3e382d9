"""The built-in steps' plain functions that both the workflow runner and the search driver call: fit the
preprocessor (the preprocess step) and register a checkpoint through the quality gate (the register step)."""
from __future__ import annotations

import json
from pathlib import Path

from modelworks import registry as registry_mod
from modelworks.config import WorkflowConfig
from modelworks.data import preprocess, sources


def passes_gate(value: float, threshold: float | None, production: float | None, better: str,
                margin: float) -> bool:
    """The quality gate: reach the threshold and beat production by ``margin``, both in the ``better``
    direction ('higher' or 'lower')."""
    sign = 1.0 if better == "higher" else -1.0
    if value != value:  # NaN: not evaluated
        return False
    if threshold is not None and sign * value < sign * threshold:
        return False
    return production is None or sign * value >= sign * production + margin


def _gate(reg: registry_mod.Registry, name: str, version: int, cfg: WorkflowConfig, metrics: dict) -> bool:
    """Move `production` only when the new version passes the workflow's quality gate."""
    metric, gate = cfg.registry.gate_metric, cfg.registry
    prod = reg.aliases(name).get("production")
    prod_value = reg.info(name, prod).get(metric) if prod is not None and prod != version else None
    if not passes_gate(metrics.get(metric, float("nan")), gate.threshold(), prod_value, gate.better(),
                       gate.gate_margin):
        return False
    reg.set_alias(name, "production", version)
    return True


def model_name(cfg: WorkflowConfig) -> str:
    """The registry name a run registers under."""
    return cfg.registry.model_name or cfg.name


def registered_version(reg: registry_mod.Registry, name: str, run_name: str, ckpt: Path) -> int | None:
    """The version of ``name`` already holding this run's checkpoint: rerunning a finished run must not mint a
    duplicate version of the same checkpoint."""
    for v in reversed(reg.versions(name)):
        meta = reg.info(name, v)
        if meta.get("run") == run_name and meta.get("checkpoint") == ckpt.name:
            return v
    return None


def register_result(cfg: WorkflowConfig, run_name: str, ckpt: Path, eval_dir: Path, metrics: dict,
                    extra_meta: dict | None = None) -> tuple[str, int, bool]:
    reg = registry_mod.Registry()
    name = model_name(cfg)
    existing = registered_version(reg, name, run_name, ckpt)
    if existing is not None:
        return name, existing, "production" in reg.info(name, existing)["aliases"]
    best = json.loads((ckpt / "metrics.json").read_text())
    meta = {"run": run_name, "checkpoint": ckpt.name, "task": cfg.model.task,
            **{k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, (int, float))},
            **{k: best[k] for k in ("val_accuracy", "val_r2", "val_mae", "val_rmse") if k in best},
            "config_digest": cfg.digest(), **(extra_meta or {})}
    version = reg.register(name, ckpt, artifacts=eval_dir, meta=meta)
    return name, version, _gate(reg, name, version, cfg, metrics)


def fit_preprocessor(cfg: WorkflowConfig, src: sources.Source, log=print):
    """The preprocess step for arrays (images, one mean/std) and tables (per column), on the training split."""
    if src.roles is not None:
        from modelworks.data import table

        log(f"      columns: {', '.join(f'{c} ({r})' for c, r in src.roles.items())}")
        return table.fit(src.splits["train"], src.roles, cfg.model.task, src.class_names, cfg.data)
    if src.arrays is not None:  # read on the driver already: no Ray Data pass for a mean and a std
        return preprocess.fit_arrays(src.arrays["train"]["x"], src.arrays["train"]["label"], src.class_names)
    return preprocess.fit(src.splits["train"], src.class_names, src.image_shape)


def describe_preprocessor(cfg: WorkflowConfig, pre) -> str:
    """One line on what the preprocess step fitted."""
    if getattr(pre, "kind", None) == "table":
        imputed = {c["name"]: c["missing"] for c in pre.columns if c["missing"]}
        return (f"{pre.rows} training rows, {pre.input_dim} model inputs, "
                + (f"{pre.num_classes} classes" if cfg.model.task == "classification" else
                   f"label '{cfg.data.label_column}' mean={pre.target_center:.4g} std={pre.target_scale:.4g}")
                + (f"; imputed {', '.join(f'{c}: {n}' for c, n in imputed.items())}" if imputed else "; nothing missing"))
    return f"input {pre.input_shape}, {pre.num_classes} classes, mean={pre.mean:.4f} std={pre.std:.4f}"
