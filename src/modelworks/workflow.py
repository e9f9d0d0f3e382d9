"""The step runner: ingest -> preprocess -> [pretrain] -> train -> evaluate -> register.

One typed function, ``run_workflow``, that the CLI and the tests both call. The workflow's ``steps`` list
says which of pretrain/train/evaluate/register run; ingest and preprocessing always come first. A run
directory holds each step's output, so a rerun of the same run skips finished steps and resumes the
running one from its last checkpoint:

    runs/<run>/preprocessor/         text: the fitted tokenizer + label map (reused on resume)
    runs/<run>/pretrain/checkpoint_epoch=N   the pre-training step (text)
    runs/<run>/checkpoint_epoch=N    the train (fine-tune) step
    runs/<run>/checkpoint_step=N     the train step of a language model (trained by steps)
    runs/<run>/evaluation/           report.md, metrics, plots
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray

from modelworks import checkpoint
from modelworks import registry as registry_mod
from modelworks import train
from modelworks.config import WorkflowConfig
from modelworks.console import Console
from modelworks.data import chars as chars_mod
from modelworks.data import corpus as corpus_mod
from modelworks.data import preprocess, sources
from modelworks.data import text as text_data
from modelworks.errors import UserError
from modelworks.evaluate import evaluate_checkpoint
from modelworks.runtime import ensure_ray, runs_root  # noqa: F401 - also imported from here by benches and tests
from modelworks.steps import (describe_preprocessor, fit_preprocessor, model_name, passes_gate,  # noqa: F401
                              register_result)


@dataclass
class RunResult:
    run: str
    run_dir: str
    checkpoint: str
    val_accuracy: float | None   # None for regression
    test_accuracy: float | None
    model: str          # name@version
    report: str
    production: bool    # whether this version now holds the `production` alias
    seconds: float
    task: str = "classification"
    val_r2: float | None = None  # regression: on the label's units, as scikit-learn's metrics
    test_r2: float | None = None
    test_mae: float | None = None
    test_rmse: float | None = None
    step_seconds: dict = field(default_factory=dict)  # wall time of each step, in order
    trainer_startup_s: dict = field(default_factory=dict)  # per training step: Ray Train start to first step
    val_loss: float | None = None        # language models: next-token loss on the whole validation text
    val_perplexity: float | None = None


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


def describe_ray(how: str) -> str:
    resources = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    gpus = f", {resources['GPU']:g} GPUs" if resources.get("GPU") else ""
    return f"{how}: {nodes} node(s), {resources.get('CPU', 0):g} CPUs{gpus}"


def run_workflow(cfg: WorkflowConfig, *, run_name: str | None = None, data_dir: str | None = None,
                 log: Console | Callable[[str], None] = print) -> RunResult:
    console = Console.from_log(log)
    if cfg.search.enabled:  # hyperparameter search first; the best trial is what gets evaluated/registered
        from modelworks.tune import run_search

        r = run_search(cfg, name=run_name, data_dir=data_dir, resume=None, log=console)
        return RunResult(r.run, r.search_dir, r.best_checkpoint, r.val_accuracy, r.test_accuracy, r.model, r.report,
                         r.production, r.seconds)
    t0 = time.time()
    run_name = run_name or default_run_name(cfg)
    run_dir = runs_root() / run_name
    _claim_run_dir(run_dir, cfg)
    console.attach_run(run_dir)  # with the CLI: Ray's output goes to run_dir/logs from here on
    with console.timed("ray start"):
        how = ensure_ray()
    steps = ["ingest", "preprocess", *cfg.steps]
    if "pretrain" in steps and not cfg.pretrain.enabled:
        steps.remove("pretrain")
    number = {name: f"[{i}/{len(steps)}]" for i, name in enumerate(steps, start=1)}
    registers = f"registers as '{model_name(cfg)}'" if "register" in steps and cfg.registry.enabled else "registers nothing"
    console.header(f"{cfg.name} ({registers})", run_name, describe_ray(how), cfg.train.workers)

    language_model = cfg.model.task == "language_model"
    with console.step(number["ingest"], "ingest") as step:
        if language_model:
            src = corpus_mod.read_corpus(cfg.data, sources.data_dir(data_dir), cfg.model.max_len)
            step["result"] = (f"corpus {src.path}: {len(src.train):,} training and {len(src.val):,} validation "
                              f"characters")
        else:
            src = sources.load_source(cfg.data, data_dir)
            step["result"] = f"{cfg.data.source} '{cfg.data.name}'" + (f" ({cfg.data.path})" if cfg.data.path else "")
    if language_model:
        best = _language_model_steps(cfg, src, run_dir, number, console)
    elif cfg.model.name == "transformer":
        best = _text_steps(cfg, src, run_dir, number, console)
    else:
        with console.step(number["preprocess"], "preprocess") as step:
            pre = fit_preprocessor(cfg, src, console)
            if src.arrays is not None:  # on the driver already: the same transform, for the object store
                datasets = {s: pre(src.arrays[s]) for s in ("train", "val")}
            else:
                datasets = {s: pre.apply(src.splits[s]) for s in ("train", "val")}
            step["result"] = describe_preprocessor(cfg, pre)
        with console.step(number["train"], "train", f"{cfg.train.workers} worker(s), {cfg.train.epochs} epochs",
                          announce=True) as step:
            train.fit(cfg, datasets, pre, runs_root(), run_name, log=console)
            best = train.best_checkpoint(run_dir, cfg.evaluate.metric)
            step["result"] = _best_line(best, cfg)

    regression = cfg.model.task == "regression"
    metrics, eval_dir = {}, run_dir / "evaluation"
    if "evaluate" in steps and language_model:
        with console.step(number["evaluate"], "evaluate") as step:
            from modelworks import evaluate_lm

            metrics = evaluate_lm.evaluate_language_model(best, src.val, eval_dir, run_name)
            step["result"] = (f"val loss {metrics['val_loss']:.4f}, perplexity {metrics['val_perplexity']:.2f} "
                              f"(the whole validation text, {metrics['val_tokens']:,} tokens), {best.name}")
    elif "evaluate" in steps:
        with console.step(number["evaluate"], "evaluate") as step:
            test = src.arrays["test"] if src.arrays is not None else src.splits["test"]
            metrics = evaluate_checkpoint(best, test, eval_dir, run_name,
                                          val_split=src.splits["val"] if cfg.model.name == "transformer" else None)
            score = (f"test R² {metrics['test_r2']:.4f}, MAE {metrics['test_mae']:.4g}, RMSE {metrics['test_rmse']:.4g}"
                     if regression else f"test accuracy {metrics['test_accuracy']:.4f}")
            step["result"] = f"{score} ({metrics['test_samples']} samples), {best.name}"

    model_ref, production = "", False
    if "register" in steps and cfg.registry.enabled:
        with console.step(number["register"], "register") as step:
            extra = {k: metrics[k] for k in ("val_loss", "val_perplexity")} if language_model else None
            name, version, production = register_result(cfg, run_name, best, eval_dir, metrics, extra)
            model_ref = f"{name}@{version}"
            step["result"] = model_ref + (" (production)" if production else
                                          f" (production unchanged: did not pass the {cfg.registry.gate_metric} gate)")
    best_metrics = json.loads((best / "metrics.json").read_text())
    result = RunResult(run_name, str(run_dir), str(best), None if language_model else best_metrics.get("val_accuracy"),
                       metrics.get("test_accuracy", None if regression or language_model else float("nan")), model_ref,
                       str(eval_dir / "report.md"), production, round(time.time() - t0, 1), cfg.model.task,
                       best_metrics.get("val_r2"), metrics.get("test_r2"), metrics.get("test_mae"),
                       metrics.get("test_rmse"), step_seconds={k: round(v, 2) for k, v in console.step_seconds.items()},
                       trainer_startup_s=console.trainer_startup_s, val_loss=metrics.get("val_loss"),
                       val_perplexity=metrics.get("val_perplexity"))
    (run_dir / "run_summary.json").write_text(result_json(result, indent=2))
    return result


def _best_line(best: Path, cfg: WorkflowConfig) -> str:
    metric = cfg.evaluate.metric
    return f"best {best.name} ({metric} {json.loads((best / 'metrics.json').read_text())[metric]:.4f})"


# ------------------------------------------------------------------------------------------ text steps
def _texts(ds: ray.data.Dataset):
    """Stream a split's texts to the driver in batches (the tokenizer trainer consumes an iterator)."""
    for batch in ds.select_columns(["text"]).iter_batches(batch_size=4096, batch_format="numpy"):
        yield from (str(t) for t in batch["text"])


def _labels(ds: ray.data.Dataset) -> list:
    return ds.unique("label")


def _text_preprocessor(cfg: WorkflowConfig, src: sources.Source, corpus: ray.data.Dataset | None,
                       encoder: checkpoint.LoadedModel | None, run_dir: Path, log) -> text_data.TextPreprocessor:
    """Fitted once per run and kept in ``run_dir/preprocessor`` so a resumed run reads text exactly as
    before; a fine-tune from a registered encoder reuses that encoder's tokenizer."""
    saved = run_dir / "preprocessor"
    if (saved / "preprocessor.json").is_file():
        log("      tokenizer: reusing this run's (fitted before)")
        return preprocess.read_dir(saved)
    labels = _labels(src.splits["train"])
    if encoder is not None:
        pre = encoder.preprocessor.with_labels(*text_data.label_map(labels, src.class_names))
        log(f"      tokenizer: the encoder's ({pre.vocab_size} WordPiece tokens)")
    else:
        texts = _texts(src.splits["train"])
        if corpus is not None:
            texts = (t for part in (texts, _texts(corpus)) for t in part)
        pre = text_data.fit(texts, labels, src.class_names, cfg.model.vocab_size, cfg.model.max_len)
        log(f"      tokenizer: WordPiece, {pre.vocab_size} tokens fitted on the training split"
            + (" and the pre-training corpus" if corpus is not None else ""))
    tmp = run_dir / "preprocessor.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, text in pre.files().items():
        (tmp / name).write_text(text)
    tmp.rename(saved)  # whole or absent
    return pre


def _text_steps(cfg: WorkflowConfig, src: sources.Source, run_dir: Path, number: dict, console: Console) -> Path:
    """preprocess -> [pretrain] -> train for a Transformer; returns the best fine-tuned checkpoint."""
    from modelworks import train_text  # Ray Train for text; image runs never import it

    pretraining = "pretrain" in number
    corpus = sources.read_text_files(cfg.pretrain.corpus, cfg.data, labelled=False, fmt="lines") \
        if pretraining and cfg.pretrain.corpus else None
    encoder = None
    if cfg.train.init_from:
        encoder, _ = registry_mod.Registry().load(cfg.train.init_from)
        if encoder.spec.get("name") != "transformer":
            raise UserError(f"train.init_from={cfg.train.init_from} is a {encoder.spec.get('name')} model, "
                            f"not a Transformer encoder")
    with console.step(number["preprocess"], "preprocess") as step:
        pre = _text_preprocessor(cfg, src, corpus, encoder, run_dir, console)
        step["result"] = f"{pre.num_classes} classes {pre.class_names}, max_len {pre.max_len}"

    init_encoder = str(encoder.path) if encoder is not None else None
    if pretraining:
        mlm = pre.with_labels([], [])
        with console.step(number["pretrain"], "pretrain", f"masked-LM, {cfg.pretrain.epochs} epochs, "
                          f"{int(cfg.pretrain.mask_prob * 100)} % of tokens masked", announce=True) as step:
            texts = src.splits["train"].select_columns(["text"])
            if corpus is not None:
                texts = texts.union(corpus.select_columns(["text"]))
            if cfg.pretrain.drop_contained:  # a second pass over the texts to the driver (SST-2: 67k rows, ~2 s)
                whole = text_data.drop_contained(_texts(texts))
                console(f"      corpus: {len(whole)} texts that are not part of a longer one (drop_contained)")
                texts = ray.data.from_items([{"text": t} for t in whole])
            datasets = {"train": mlm.apply(texts), "val": mlm.apply(src.splits["val"].select_columns(["text"]))}
            spec = train_text.text_model_spec(cfg, mlm, "mlm")
            pre_dir = train_text.fit_text(cfg, "mlm", datasets, mlm, spec, run_dir, "pretrain", log=console)
            last = train.list_checkpoints(pre_dir)[-1][1]  # the encoder after the whole schedule
            info = json.loads((last / "metrics.json").read_text())
            step["result"] = (f"encoder {last.name}, masked-token accuracy {info['val_accuracy']:.4f} "
                              f"(val loss {info['val_loss']:.3f})")
            if "register" in cfg.steps and cfg.registry.enabled:
                step["result"] += f", registered as {register_encoder(cfg, run_dir.name, last, info)}"
        init_encoder = str(last)

    spec = train_text.text_model_spec(cfg, pre, "classify")
    if encoder is not None:  # the architecture is the encoder's, whatever the config says
        spec.update({k: encoder.spec[k] for k in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads",
                                                  "d_ff", "pad_id")})
    start = "from the pre-trained encoder" if init_encoder else "from scratch"
    with console.step(number["train"], "train", f"fine-tune {start}, {cfg.train.workers} worker(s), "
                      f"{cfg.train.epochs} epochs", announce=True) as step:
        datasets = {s: pre.apply(src.splits[s]) for s in ("train", "val")}
        train_text.fit_text(cfg, "classify", datasets, pre, spec, run_dir.parent, run_dir.name,
                            init_encoder=init_encoder, log=console)
        best = train.best_checkpoint(run_dir, cfg.evaluate.metric)
        step["result"] = _best_line(best, cfg)
    return best


# ------------------------------------------------------------------------------------ language model
def _language_model_steps(cfg: WorkflowConfig, corpus: corpus_mod.Corpus, run_dir: Path, number: dict,
                          console: Console) -> Path:
    """preprocess (the character vocabulary of the training text) -> train by steps; returns the checkpoint
    with the lowest validation loss."""
    from modelworks import train_lm  # Ray Train for language models; other runs never import it

    with console.step(number["preprocess"], "preprocess") as step:
        pre = chars_mod.fit(corpus.train)
        # One byte per token when the vocabulary allows: the ids travel to every worker.
        dtype = np.uint8 if pre.vocab_size <= 256 else np.int32
        ids = {"train": pre.encode(corpus.train).astype(dtype), "val": pre.encode(corpus.val).astype(dtype)}
        step["result"] = f"{pre.vocab_size} characters fitted on the training text"
    steps = train_lm.total_steps(cfg, len(ids["train"]))
    spec = train_lm.lm_model_spec(cfg, pre)
    with console.step(number["train"], "train", f"causal LM, {cfg.train.workers} worker(s), {steps} steps of "
                      f"{cfg.train.batch_size}x{cfg.model.max_len} tokens", announce=True) as step:
        train_lm.fit_lm(cfg, ids["train"], ids["val"], pre, spec, run_dir.parent, run_dir.name, log=console)
        best = train.best_checkpoint(run_dir, cfg.evaluate.metric)
        step["result"] = _best_line(best, cfg)
    return best


def register_encoder(cfg: WorkflowConfig, run_name: str, ckpt: Path, info: dict) -> str:
    """The pre-trained encoder as its own registry model, so other workflows fine-tune from it
    (``train.init_from = "<name>-encoder@production"``)."""
    reg = registry_mod.Registry()
    name = cfg.pretrain.register_as or f"{cfg.registry.model_name or cfg.name}-encoder"
    for v in reversed(reg.versions(name)):
        meta = reg.info(name, v)
        if meta.get("run") == run_name and meta.get("checkpoint") == ckpt.name:
            return f"{name}@{v}"
    version = reg.register(name, ckpt, meta={"run": run_name, "checkpoint": ckpt.name, "task": "mlm",
                                             "val_mlm_accuracy": info["val_accuracy"],
                                             "val_mlm_loss": info["val_loss"], "config_digest": cfg.digest()})
    reg.set_alias(name, "production", version)  # the newest finished pre-training is the one to build on
    return f"{name}@{version}"


def result_json(result: RunResult, indent: int | None = None) -> str:
    return json.dumps(asdict(result), indent=indent)
