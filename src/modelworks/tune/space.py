"""The search space: the workflow's ``search.space`` (config_sections.SPACE_KINDS) as Ray Tune domains, and a trial's
config: the base workflow with one sample of it."""
from __future__ import annotations

from typing import Any

from modelworks.config import WorkflowConfig, validate


def tune_domain(spec: Any):
    """A config domain spec (see config_sections.SPACE_KINDS) -> a Ray Tune domain; scalars stay constants."""
    from ray import tune

    if isinstance(spec, list):
        return tune.choice(spec)
    if not isinstance(spec, dict):
        return spec
    kind, args = next(iter(spec.items()))
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "quniform":
        return tune.quniform(*args)
    if kind == "randint":
        return tune.randint(*args)
    return tune.choice(args)


def possible_values(cfg: WorkflowConfig, key: str) -> list:
    """Every value a trial may take for a dotted key (only meaningful for choices/constants)."""
    spec = cfg.search.space.get(key)
    if spec is None:
        section, _, fld = key.partition(".")
        return [getattr(getattr(cfg, section), fld)]
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            return args
        if kind == "randint":
            return list(range(int(args[0]), int(args[1])))
        return [args[1]]
    return [spec]


def trial_config(base: WorkflowConfig, params: dict[str, Any]) -> WorkflowConfig:
    """The base workflow config with a trial's sampled values (dotted keys) and the search's epoch budget."""
    data = base.model_dump(mode="json")
    for key, value in params.items():
        section, _, fld = key.partition(".")
        data[section][fld] = value.item() if hasattr(value, "item") else value
    data["train"]["epochs"] = max_epochs(base)
    data["search"]["enabled"] = False  # a trial is a plain training run
    return validate(data)


def max_epochs(cfg: WorkflowConfig) -> int:
    return cfg.search.max_epochs or cfg.train.epochs


def search_name(cfg: WorkflowConfig) -> str:
    """Deterministic (config digest with `enabled` normalised), so the same command finds the same search."""
    norm = cfg.model_copy(deep=True)
    norm.search.enabled = True
    return f"{cfg.name}-search-{norm.digest()}"


def param_space(cfg: WorkflowConfig) -> dict:
    """What ``tune.Tuner(param_space=...)`` takes: every dimension, in a stable (sorted) order."""
    return {k: tune_domain(v) for k, v in sorted(cfg.search.space.items())}
