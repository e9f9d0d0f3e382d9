"""The sections of a workflow config, one pydantic model each: data, model, train, pretrain, evaluate,
registry, search, serve. Each checks its own fields; config.py joins them into ``WorkflowConfig`` and checks
them against each other.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


# data.source="sklearn": data.name -> the scikit-learn loader (each ships its table inside the package).
SKLEARN_TABLES = {"wine": "load_wine", "diabetes": "load_diabetes", "iris": "load_iris",
                  "breast_cancer": "load_breast_cancer"}


def is_tabular(data: DataConfig) -> bool:
    """Data read column by column (per-column preprocessing), rather than as one array per row."""
    return data.source == "sklearn" or (data.source == "table" and not data.image_column)


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
    vocab_size: int = Field(8000, ge=100, description="BPE vocabulary fitted on the training split")
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
    # Disk: every epoch's checkpoint of a long run adds up (the SST-2 encoder: 40 of them).
    keep_checkpoints: int | None = Field(2, ge=1, description="checkpoints a run keeps: the N best by evaluate.metric, "
                                                              "and the newest (resume needs it); null = every one")
    random_seed: int = Field(0, description="initial weights, batch order and masks (one run, one result)")


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
    whole_word: bool = Field(False, description="hide a word's pieces together (whole-word masking); mask_prob "
                                                "is then the share of words")
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
    random_seed: int = Field(0, description="the search's draws from the space")
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
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="where Serve runs an HTTP proxy: on every node (a load balancer in front, the usual "
                                 "cluster) or on the head only (one entry point; also several nodes on one machine, "
                                 "whose proxies would all want the same port)")
    access_log: bool = Field(False, description="one log line per request in the replica's log; costs 5-15 % of "
                                                "a replica's throughput (bench/serve_load.py), errors are logged anyway")

    @model_validator(mode="after")
    def _check_replicas(self) -> "ServeConfig":
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"serve.max_replicas ({self.max_replicas}) must be >= serve.min_replicas "
                             f"({self.min_replicas}) and >= 1")
        return self
