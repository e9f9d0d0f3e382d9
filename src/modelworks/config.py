"""The one validated config a workflow builds: data, model, training, evaluation, search, serving.

Configs are data (pydantic models with ``extra="forbid"``): an unknown key or a wrong type fails with
one line naming the key. ``apply_overrides`` implements the CLI's ``--set section.key=value``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelworks.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    # digits: scikit-learn's 8x8 digits, shipped inside scikit-learn (no data directory needed).
    # idx: MNIST-style IDX files (name picks the sub-folder and download mirror: mnist, fashion-mnist).
    # table: Parquet or CSV at `path` (local or any pyarrow filesystem URI such as s3://).
    # text: sentences with labels in CSV/TSV/JSONL/Parquet (optionally .gz) at `path`, or, without `path`,
    #   <data-dir>/<name>/{train,validation,test}.<ext> as the dataset ships them (sst2).
    # sklearn: a table shipped inside scikit-learn, picked by `name` (SKLEARN_TABLES); offline.
    # corpus: one plain-text file for a language model (`path`, or <data-dir>/<name>/input.txt); its first
    #   1 - val_fraction of characters train and the rest validate, so validation is text the model never saw.
    # A table without image_column (and every sklearn table) is read column by column: each feature column
    # is numeric or categorical (inferred from its type, overridable below) and preprocessed on its own.
    source: Literal["digits", "idx", "table", "text", "sklearn", "corpus"] = "digits"
    name: str = "digits"
    path: str | None = Field(None, description="table/text: training file; idx: folder holding the IDX files")
    val_path: str | None = Field(None, description="text: validation file (else carved from `path`)")
    test_path: str | None = Field(None, description="table/text: held-out test file (else carved from `path`)")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    text_column: str = Field("text", description="text: column holding the text")
    label_column: str = "label"
    image_column: str | None = Field(None, description="table: column holding a flat/2-D pixel array")
    feature_columns: list[str] | None = Field(None, description="table: pixel/feature columns (default: all but label)")
    numeric_columns: list[str] | None = Field(None, description="table: columns to read as numbers (default: inferred "
                                                                "from the column type)")
    categorical_columns: list[str] | None = Field(None, description="table: columns to one-hot encode (default: text "
                                                                    "and boolean-like columns)")
    scaling: Literal["standard", "minmax"] = Field("standard", description="table: numeric columns scaled per column "
                                                                           "to mean 0 / std 1, or to 0..1")
    max_categories: int = Field(50, ge=1, description="table: one-hot slots per categorical column (the most "
                                                      "frequent values; rarer ones share the 'unknown' slot)")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, description="digits/table without test_path")
    split_seed: int = 0
    download: bool = Field(True, description="idx: fetch from the usual mirrors when files are absent")
    # Each training worker reads its shard once through Ray Data, then keeps it in memory (as tensors)
    # for the remaining epochs when it fits: the per-batch cost of the streaming iterator dominates
    # small models like the MNIST MLP. Set false to stream every epoch (datasets larger than memory).
    cache_on_worker: bool = True
    max_rows: int | None = Field(None, gt=0, description="use only the first N training rows (smoke runs)")


class ModelConfig(_Strict):
    name: Literal["mlp", "transformer"] = "mlp"
    # regression: one output, a number in the label's units (tables only); classification: one per class;
    # language_model: a causal Transformer predicting each next token (data.source='corpus').
    task: Literal["classification", "regression", "language_model"] = "classification"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # mlp
    hidden_sizes: list[int] = Field(default_factory=lambda: [256, 128])
    # transformer (models/transformer.py): an encoder of n_layers pre-LayerNorm blocks
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    d_ff: int = Field(512, ge=8, description="width of the position-wise feed-forward layer")
    max_len: int = Field(64, ge=4, description="tokens per text (with [CLS] and [SEP]); longer texts are truncated. "
                                               "language_model: the context (block size) it trains and generates with")
    vocab_size: int = Field(8000, ge=100, description="WordPiece vocabulary fitted on the training split")
    pooling: Literal["mean", "cls"] = "mean"
    use_sdpa: bool = Field(True, description="fused scaled_dot_product_attention; false = the written-out one")

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    # language_model: training counts optimizer steps; without max_steps, `epochs` passes over the training
    # text's tokens (batch_size windows of model.max_len per step).
    max_steps: int | None = Field(None, ge=1, description="language_model: optimizer steps in all")
    eval_every: int = Field(250, ge=1, description="language_model: evaluate and checkpoint every N steps")
    eval_batches: int = Field(20, ge=1, description="language_model: validation batches per evaluation (the same "
                                                    "windows every time, so the curve compares like with like)")
    batch_size: int = Field(64, ge=1, description="global batch: split across workers, as in the seed")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Text models: the schedule is per optimizer step (linear warm-up, then constant or cosine to min_lr).
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="text: share of the steps spent warming up")
    min_lr: float = Field(0.0, ge=0.0, description="text: where the cosine decay ends")
    beta2: float = Field(0.999, gt=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0, description="text: clip the gradient norm (null = off)")
    grad_accum: int = Field(1, ge=1, description="text: micro-batches per optimizer step")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    loss: Literal["auto", "cross_entropy", "mse", "huber"] = Field(
        "auto", description="auto: cross-entropy for classification, mse for regression")
    init_from: str | None = Field(None, description="text: fine-tune from a registered encoder (NAME@VERSION|ALIAS)")
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = forever")
    seed: int = 0


class PretrainConfig(_Strict):
    """The `pretrain` step: masked-language modelling on the training sentences (labels unused) and any
    extra unlabelled corpus, before the `train` step fine-tunes the encoder for the task."""
    enabled: bool = Field(True, description="false: skip pre-training; `train` starts from scratch (the baseline)")
    corpus: list[str] = Field(default_factory=list, description="extra plain-text files, one example per line")
    drop_contained: bool = Field(False, description="pre-train only on texts that are not part of a longer one "
                                                    "(a treebank lists every phrase of every sentence)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0.0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    beta2: float = Field(0.98, gt=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0, description="share of tokens hidden (80 % [MASK], 10 % random, 10 % kept)")
    # A short pre-training underfits rather than overfits, so it learns faster without dropout (as in
    # "Cramming" BERT); fine-tuning then uses model.dropout.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    register_as: str | None = Field(None, description="registry name of the pre-trained encoder (default <name>-encoder)")


class EvaluateConfig(_Strict):
    # Picks the best checkpoint (validation split only). Regression defaults to val_r2.
    metric: Literal["val_accuracy", "val_r2", "val_loss"] = "val_accuracy"
    batch_size: int = Field(1024, ge=1)
    # language_model: report.md shows what the model writes after each prompt (greedy would loop; this samples
    # with a fixed random seed, so the same checkpoint always shows the same text).
    sample_prompts: list[str] = Field(default_factory=lambda: ["\n"], description="language_model: prompts for "
                                                                                  "the report's samples")
    sample_tokens: int = Field(300, ge=1, le=10_000, description="language_model: new tokens per sample")
    sample_temperature: float = Field(0.8, ge=0.0, le=2.0)
    sample_top_k: int | None = Field(None, ge=1)


# Metrics the registry gate can read, and which way is better (regression defaults to test_r2; a language
# model, which has no test split, to val_loss on the whole validation text).
GATE_METRICS = {"test_accuracy": "higher", "test_loss": "lower", "test_r2": "higher", "test_mae": "lower",
                "test_rmse": "lower", "val_loss": "lower"}
# Metrics that exist for one task only (losses exist for all).
TASK_METRICS = {"classification": {"val_accuracy", "test_accuracy"},
                "regression": {"val_r2", "test_r2", "test_mae", "test_rmse"}}


class RegisterConfig(_Strict):
    enabled: bool = True
    model_name: str | None = Field(None, description="default: the workflow name")
    # The `production` alias moves only when the gate metric reaches its threshold and beats the current
    # production version by at least `gate_margin` (in the metric's units, in its better direction).
    gate_metric: Literal["test_accuracy", "test_loss", "test_r2", "test_mae", "test_rmse", "val_loss"] = "test_accuracy"
    gate_direction: Literal["auto", "higher", "lower"] = Field("auto", description="auto: higher for accuracy "
                                                                                   "and R², lower for errors")
    gate_threshold: float | None = Field(None, description="the gate metric must reach this (default: min_accuracy "
                                                           "for test_accuracy, none otherwise)")
    min_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    gate_margin: float = 0.0

    def better(self) -> str:
        """'higher' or 'lower': which way the gate metric improves."""
        return GATE_METRICS[self.gate_metric] if self.gate_direction == "auto" else self.gate_direction

    def threshold(self) -> float | None:
        if self.gate_threshold is not None:
            return self.gate_threshold
        return self.min_accuracy if self.gate_metric == "test_accuracy" else None


# Search-space domains: {"loguniform": [lo, hi]}, {"uniform": [lo, hi]}, {"quniform": [lo, hi, q]},
# {"randint": [lo, hi]} (hi exclusive), {"choice": [a, b, ...]}; a bare list means choice, a scalar a constant.
SPACE_KINDS = {"loguniform": 2, "uniform": 2, "quniform": 3, "randint": 2, "choice": None}
# Sections whose fields a search may vary; a key without a dot ("lr") names the first section holding it.
SEARCHABLE_SECTIONS = ("train", "model", "data")


def _section_fields(section: str) -> set[str]:
    return set({"train": TrainConfig, "model": ModelConfig, "data": DataConfig}[section].model_fields)


class SearchConfig(_Strict):
    enabled: bool = False
    num_samples: int = Field(8, ge=1)
    space: dict[str, Any] = Field(default_factory=dict, description="dotted key -> tune domain spec")
    max_epochs: int | None = Field(None, ge=1, description="epochs of a trial that is never stopped (default train.epochs)")
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)
    searcher: Literal["random"] = "random"
    scheduler: Literal["asha", "fifo"] = Field("asha", description="fifo runs every trial to max_epochs")
    seed: int = 0
    max_concurrent: int | None = Field(None, ge=1, description="default: what the cluster's CPUs allow")
    cpus_per_trial: float | None = Field(None, gt=0, description="default: 1 CPU per training worker")

    @model_validator(mode="after")
    def _check_space(self) -> "SearchConfig":
        """Dotted keys must name a train/model/data field; short keys are resolved; domains are checked."""
        resolved: dict[str, Any] = {}
        for key, spec in self.space.items():
            if spec is None:  # --set search.space.lr=null removes a dimension
                continue
            section, dot, field = key.partition(".")
            if not dot:
                homes = [s for s in SEARCHABLE_SECTIONS if key in _section_fields(s)]
                if not homes:
                    raise ValueError(f"search.space: '{key}' is not a field of {'/'.join(SEARCHABLE_SECTIONS)}")
                section, field = homes[0], key
            elif section not in SEARCHABLE_SECTIONS or field not in _section_fields(section):
                raise ValueError(f"search.space: '{key}' is not a config field (use e.g. train.lr, model.dropout)")
            if isinstance(spec, dict):
                if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
                    raise ValueError(f"search.space.{key}: a domain is one of {sorted(SPACE_KINDS)} "
                                     f"(e.g. {{\"loguniform\": [1e-4, 1e-2]}}), got {spec!r}")
                kind, args = next(iter(spec.items()))
                need = SPACE_KINDS[kind]
                if not isinstance(args, list) or not args or (need is not None and len(args) != need):
                    raise ValueError(f"search.space.{key}: {kind} takes a list of "
                                     f"{need or 'one or more'} values, got {args!r}")
                if kind != "choice" and not (args[0] < args[1]):
                    raise ValueError(f"search.space.{key}: {kind} needs low < high, got {args!r}")
                if kind == "loguniform" and args[0] <= 0:
                    raise ValueError(f"search.space.{key}: loguniform needs low > 0, got {args!r}")
            elif isinstance(spec, list) and not spec:
                raise ValueError(f"search.space.{key}: an empty list of choices")
            resolved[f"{section}.{field}"] = spec
        if resolved != self.space:
            object.__setattr__(self, "space", resolved)
        return self


class ServeConfig(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    max_batch_size: int = Field(64, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_queued_requests: int = Field(256, ge=-1)
    request_timeout_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_inputs: int = Field(256, ge=1)
    max_text_chars: int = Field(2000, ge=1, description="text models: characters per text; a longer text is refused "
                                                        "(422), not truncated")
    max_prompt_chars: int = Field(1000, ge=1, description="language models: characters per /generate prompt; a "
                                                          "longer prompt is refused (422), not truncated")
    max_new_tokens: int = Field(1000, ge=1, description="language models: the most tokens one /generate request "
                                                        "may ask for (its max_new_tokens)")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    replica_cpus: float = Field(0.5, gt=0, description="CPUs reserved per replica (2 replicas fit in 1 CPU)")
    alias_poll_s: float = Field(2.0, ge=0, description="replicas serving NAME@ALIAS re-resolve it this often; 0 = never")
    access_log: bool = Field(False, description="one log line per request in the replica's log; costs 5-15 % of "
                                                "a replica's throughput (bench/serve_load.py), errors are logged anyway")

    @model_validator(mode="after")
    def _check_replicas(self) -> "ServeConfig":
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"serve.max_replicas ({self.max_replicas}) must be >= serve.min_replicas "
                             f"({self.min_replicas}) and >= 1")
        return self


# The steps a workflow can chain, in the order they run; data ingest and preprocessing come first always.
STEPS = ("pretrain", "train", "evaluate", "register")
DEFAULT_STEPS = ["train", "evaluate", "register"]


# data.source="sklearn": data.name -> the scikit-learn loader (each ships its table inside the package).
SKLEARN_TABLES = {"wine": "load_wine", "diabetes": "load_diabetes", "iris": "load_iris",
                  "breast_cancer": "load_breast_cancer"}


def is_tabular(data: DataConfig) -> bool:
    """Data read column by column (per-column preprocessing), rather than as one array per row."""
    return data.source == "sklearn" or (data.source == "table" and not data.image_column)


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
    path = Path(path)
    if not path.is_file():
        raise UserError(f"workflow file not found: {path} (try workflows/digits.py)")
    spec = importlib.util.spec_from_file_location(f"modelworks_workflow_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ValidationError as err:
        raise UserError(f"{path}: {format_validation_error(err)}") from None
    cfg = getattr(module, "CONFIG", None)
    if not isinstance(cfg, WorkflowConfig):
        raise UserError(f"{path} must define CONFIG = WorkflowConfig(...)")
    return cfg
