"""The one validated config a workflow builds: data, model, training, evaluation, search, serving.

Configs are data (pydantic models with ``extra="forbid"``): an unknown key or a wrong type fails with
one line naming the key. The sections, each with its fields and defaults, are in config_sections.py; this
module joins them into ``WorkflowConfig``, checks them against each other, loads a workflow file
(``load_workflow``) and applies the CLI's ``--set section.key=value`` (``apply_overrides``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from modelworks.config_sections import (SKLEARN_TABLES, DataConfig, EvaluateConfig, ModelConfig, PretrainConfig,
                                        RegisterConfig, SearchConfig, ServeConfig, TrainConfig, _Strict, is_tabular)
from modelworks.errors import UserError


# The steps a workflow can chain, in the order they run; data ingest and preprocessing come first always.
STEPS = ("pretrain", "train", "evaluate", "register")
DEFAULT_STEPS = ["train", "evaluate", "register"]
# Metrics that exist for one task only (losses exist for all).
TASK_METRICS = {"classification": {"val_accuracy", "test_accuracy"},
                "regression": {"val_r2", "test_r2", "test_mae", "test_rmse"}}


class WorkflowConfig(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    steps: list[Literal["pretrain", "train", "evaluate", "register"]] = Field(default_factory=lambda: list(DEFAULT_STEPS))
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegisterConfig = Field(default_factory=RegisterConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _check_source(self) -> "WorkflowConfig":
        if self.data.source == "table" and not self.data.path:
            raise ValueError("data.path is required when data.source='table'")
        text_data, text_model = self.data.source in ("text", "corpus"), self.model.name == "transformer"
        if text_data != text_model:
            raise ValueError(f"model.name='{self.model.name}' does not read data.source='{self.data.source}': "
                             f"the transformer reads text, the mlp reads images and tables")
        if (self.data.source == "corpus") != (self.model.task == "language_model"):
            raise ValueError("a language model (model.task='language_model') reads data.source='corpus', and a "
                             "corpus trains only a language model: set both or neither")
        if list(self.steps) != [s for s in STEPS if s in self.steps] or "train" not in self.steps:
            raise ValueError(f"steps {self.steps}: need 'train', each step once, in the order {list(STEPS)}")
        if "pretrain" in self.steps and (not text_model or self.model.task == "language_model"):
            raise ValueError("steps: 'pretrain' (masked-language modelling) needs model.name='transformer'")
        if "register" in self.steps and "evaluate" not in self.steps:
            raise ValueError("steps: 'register' needs 'evaluate' (the gate reads the test metrics)")
        if self.search.enabled and text_model:
            raise ValueError("search.enabled: searching a transformer is not supported yet; run the text workflow "
                             "without search")
        if self.data.source == "sklearn" and self.data.name not in SKLEARN_TABLES:
            raise ValueError(f"data.name '{self.data.name}' is not a scikit-learn table; data.source='sklearn' takes "
                             f"one of {', '.join(SKLEARN_TABLES)}")
        self._check_task()
        return self

    def _check_task(self) -> None:
        """Loss, selection metric and gate metric must fit model.task; their defaults follow it."""
        if self.model.task == "language_model":
            self._check_language_model()
            return
        regression = self.model.task == "regression"
        if regression and not is_tabular(self.data):
            raise ValueError(f"model.task='regression' needs table data (data.source='table' or 'sklearn'), not "
                             f"data.source='{self.data.source}'" + (" with data.image_column" if self.data.image_column
                                                                    else ""))
        if regression and self.search.enabled:
            raise ValueError("search.enabled: searching a regression model is not supported yet; run without search")
        if self.train.loss != "auto" and (self.train.loss == "cross_entropy") == regression:
            raise ValueError(f"train.loss='{self.train.loss}' does not fit model.task='{self.model.task}' "
                             f"(classification: cross_entropy; regression: mse or huber)")
        # Each task's default metric swaps for the other's (so `--set model.task=regression` just works);
        # any other metric that does not exist for the task is an error.
        for section, field, defaults in ((self.evaluate, "metric", {"classification": "val_accuracy",
                                                                    "regression": "val_r2"}),
                                         (self.registry, "gate_metric", {"classification": "test_accuracy",
                                                                         "regression": "test_r2"})):
            value, other = getattr(section, field), "classification" if regression else "regression"
            if value not in TASK_METRICS[other]:
                continue
            if value == defaults[other]:
                object.__setattr__(section, field, defaults[self.model.task])
                continue
            name = "evaluate" if section is self.evaluate else "registry"
            raise ValueError(f"{name}.{field}='{value}' is a {other} metric; model.task='{self.model.task}' uses "
                             f"{', '.join(sorted(TASK_METRICS[self.model.task]))} or the loss")
        if regression and self.registry.min_accuracy > 0:
            raise ValueError("registry.min_accuracy is for classification; a regression gate uses "
                             "registry.gate_threshold (e.g. --set registry.gate_threshold=0.4 with test_r2)")

    def _check_language_model(self) -> None:
        """A language model is judged by its loss: the defaults move to val_loss, anything else is an error."""
        for section, field, default in ((self.evaluate, "metric", "val_accuracy"),
                                        (self.registry, "gate_metric", "test_accuracy")):
            value = getattr(section, field)
            if value == default:
                object.__setattr__(section, field, "val_loss")
            elif value != "val_loss":
                name = "evaluate" if section is self.evaluate else "registry"
                raise ValueError(f"{name}.{field}='{value}': a language model is selected and gated on val_loss")
        if self.registry.min_accuracy > 0:
            raise ValueError("registry.min_accuracy is for classification; gate a language model with "
                             "registry.gate_threshold on val_loss (e.g. --set registry.gate_threshold=2.0)")
        if self.train.loss not in ("auto", "cross_entropy"):
            raise ValueError(f"train.loss='{self.train.loss}': a language model trains with cross_entropy")
        if self.train.optimizer == "adam":  # the default; decoupled weight decay is what GPT training uses
            object.__setattr__(self.train, "optimizer", "adamw")
        elif self.train.optimizer != "adamw":
            raise ValueError(f"train.optimizer='{self.train.optimizer}': a language model trains with adamw")

    def digest(self) -> str:
        """Short stable hash of the config: names runs so the same command resumes the same run."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `config: train.epochs: Input should be a valid integer (got 'x')`."""
    # A section built on its own (TrainConfig(epochs=0) in a workflow file) reports locations relative to
    # it; prefix the section name so the key reads as it would in --set.
    sections = {f.annotation.__name__: name for name, f in WorkflowConfig.model_fields.items()
                if isinstance(f.annotation, type)}
    prefix = [sections[err.title]] if err.title in sections else []
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in prefix + list(e["loc"])) or "config"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown config key '{loc}' (check the spelling; see modelworks/config.py)")
        elif not e["loc"] and e["type"] == "value_error":  # a check across sections: its message names the keys
            parts.append(e["msg"].removeprefix("Value error, "))
        else:
            parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(parts)


def validate(data: dict[str, Any]) -> WorkflowConfig:
    try:
        return WorkflowConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err)) from None


def _parse_value(text: str) -> Any:
    """`--set` values are JSON when they parse as JSON (3, 1e-3, true, [256,128]), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _data_model_name(data: dict, keys: set[str]) -> str | None:
    """The registry name for other data than the workflow's, given on the command line: data.name when it
    is given, else the table file's name (wine.csv -> wine), so wine data run through workflows/digits.py
    does not become another `digits` version. Other data means a new data.source or data.name, or a new
    data.path for a table; a new path for text (its train/validation/test files) keeps the workflow's name.
    None when the name stays, or registry.model_name is given."""
    tabular = data.get("source") == "sklearn" or (data.get("source") == "table" and not data.get("image_column"))
    other = bool(keys & {"data.source", "data.name"}) or ("data.path" in keys and tabular)
    if "registry.model_name" in keys or not other:
        return None
    if "data.name" not in keys and data.get("path"):
        stem = str(data["path"]).rstrip("/").rsplit("/", 1)[-1].split(".")[0]
        return re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip("-_.") or None
    return str(data.get("name")) or None


def apply_overrides(cfg: WorkflowConfig, overrides: list[str]) -> WorkflowConfig:
    data = cfg.model_dump(mode="json")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got '{item}' (e.g. --set train.epochs=3)")
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            known = isinstance(node, dict) and part in node
            # search.space is a free-form mapping: new keys are allowed inside it.
            free_form = parts[:i] == ["search", "space"]
            if not known and not free_form:
                raise UserError(f"unknown config key '{key}' in --set (known at this level: "
                                f"{', '.join(sorted(node)) if isinstance(node, dict) else 'none'})")
            if i == len(parts) - 1:
                node[part] = _parse_value(raw)
            else:
                node = node.setdefault(part, {})
    name = _data_model_name(data["data"], {item.partition("=")[0] for item in overrides})
    if name and name != data["name"]:
        data["registry"]["model_name"] = name
    return validate(data)


def load_workflow(path: str | Path) -> WorkflowConfig:
    """Import a workflow file; it defines ``CONFIG = WorkflowConfig(...)``."""
    return load_workflow_file(path)[0]


def load_workflow_file(path: str | Path) -> tuple[WorkflowConfig, dict]:
    """The workflow file's ``CONFIG`` and its namespace (where its ``@step`` functions are)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"workflow file not found: {path} (try workflows/digits.py)")
    # Not entered in sys.modules: Ray then pickles the file's step functions by value, so a worker runs them
    # without importing the workflow file.
    spec = importlib.util.spec_from_file_location(f"modelworks_workflow_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ValidationError as err:
        raise UserError(f"{path}: {format_validation_error(err)}") from None
    cfg = getattr(module, "CONFIG", None)
    if not isinstance(cfg, WorkflowConfig):
        raise UserError(f"{path} must define CONFIG = WorkflowConfig(...)")
    return cfg, vars(module)
