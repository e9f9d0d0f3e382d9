"""The built-in model steps: ``pretrain`` (text), ``train`` or ``search``, ``evaluate``, ``register``.

`train` and `search` return the same output value (the best checkpoint, its metrics and the learning curve),
so `evaluate` and `register` do not know which of the two ran. The trainers write where they always have:

    runs/<run>/checkpoint_epoch=N (checkpoint_step=N)   train
    runs/<run>/<trial_id>/...                           search (Tune's experiment folder is the run's)
    runs/<run>/pretrain/checkpoint_epoch=N              pretrain
    runs/<run>/evaluation/                              evaluate: report.md, metrics, plots
"""
from __future__ import annotations

import json
from pathlib import Path

from modelworks import registry as registry_mod
from modelworks import train, warmup
from modelworks.pipeline.data_steps import init_encoder, pretrain_corpus
from modelworks.pipeline.types import Context, Output
from modelworks.steps import register_result, registered_version


def _checkpoint_value(best: Path, last: Path) -> dict:
    """What train and search output: the chosen checkpoint, its metrics, and the curve from the newest one."""
    metrics = json.loads((best / "metrics.json").read_text())
    history = json.loads((last / "metrics.json").read_text()).get("history", [])
    return {"checkpoint": str(best), "metrics": {k: v for k, v in metrics.items() if k != "history"},
            "history": history}


def _best_line(best: Path, metric: str) -> str:
    return f"best {best.name} ({metric} {json.loads((best / 'metrics.json').read_text())[metric]:.4f})"


# -------------------------------------------------------------------------------------------- pretrain
def pretrain_detail(ctx: Context) -> str:
    p = ctx.cfg.pretrain
    return f"masked-LM, {p.epochs} epochs, {int(p.mask_prob * 100)} % of {'words' if p.whole_word else 'tokens'} masked"


def pretrain(ctx: Context) -> Output:
    import ray

    from modelworks import train_text
    from modelworks.data import text as text_data
    from modelworks.pipeline.data_steps import split_texts

    cfg, src = ctx.cfg, ctx.obj("ingest")
    pre, _ = ctx.obj("preprocess")
    mlm = pre.with_labels([], [])
    texts = src.splits["train"].select_columns(["text"])
    corpus = pretrain_corpus(cfg)
    if corpus is not None:
        texts = texts.union(corpus.select_columns(["text"]))
    if cfg.pretrain.drop_contained:  # a second pass over the texts to the driver (SST-2: 67k rows, ~2 s)
        whole = text_data.drop_contained(split_texts(texts))
        ctx.console(f"      corpus: {len(whole)} texts that are not part of a longer one (drop_contained)")
        texts = ray.data.from_items([{"text": t} for t in whole])
    datasets = {"train": mlm.apply(texts), "val": mlm.apply(src.splits["val"].select_columns(["text"]))}
    spec = train_text.text_model_spec(cfg, mlm, "mlm")
    pre_dir = train_text.fit_text(cfg, "mlm", datasets, mlm, spec, ctx.run_dir, "pretrain", log=ctx.console)
    last = train.list_checkpoints(pre_dir)[-1][1]  # the encoder after the whole schedule
    info = json.loads((last / "metrics.json").read_text())
    result = (f"encoder {last.name}, masked-token accuracy {info['val_accuracy']:.4f} "
              f"(val loss {info['val_loss']:.3f})")
    value = {"encoder": str(last), "metrics": {k: v for k, v in info.items() if k != "history"},
             "history": info.get("history", [])}
    if "register" in cfg.steps and cfg.registry.enabled:
        value["registered"] = register_encoder(ctx, last, info)
        result += f", registered as {value['registered']}"
    return Output(value, [f"pretrain/{last.name}"], None, result)


def register_encoder(ctx: Context, ckpt: Path, info: dict) -> str:
    """The pre-trained encoder as its own registry model, so other workflows fine-tune from it
    (``train.init_from = "<name>-encoder@production"``)."""
    cfg, run_name = ctx.cfg, ctx.run_dir.name
    reg = registry_mod.Registry()
    name = cfg.pretrain.register_as or f"{cfg.registry.model_name or cfg.name}-encoder"
    existing = registered_version(reg, name, run_name, ckpt)
    if existing is not None:
        return f"{name}@{existing}"
    version = reg.register(name, ckpt, meta={"run": run_name, "checkpoint": ckpt.name, "task": "mlm",
                                             "val_mlm_accuracy": info["val_accuracy"],
                                             "val_mlm_loss": info["val_loss"], "config_digest": cfg.digest()})
    reg.set_alias(name, "production", version)  # the newest finished pre-training is the one to build on
    return f"{name}@{version}"


# ----------------------------------------------------------------------------------------------- train
def train_detail(ctx: Context) -> str:
    cfg = ctx.cfg
    if cfg.model.task == "language_model":
        return (f"causal LM, {cfg.train.workers} worker(s), "
                f"{cfg.train.max_steps or str(cfg.train.epochs) + ' epochs of'} steps of "
                f"{cfg.train.batch_size}x{cfg.model.max_len} tokens")
    if cfg.model.name == "transformer":
        start = "from the pre-trained encoder" if ("pretrain" in ctx.values or cfg.train.init_from) else "from scratch"
        return f"fine-tune {start}, {cfg.train.workers} worker(s), {cfg.train.epochs} epochs"
    return f"{cfg.train.workers} worker(s), {cfg.train.epochs} epochs"


def train_step(ctx: Context) -> Output:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    pre, datasets = ctx.obj("preprocess")
    if "evaluate" in ctx.number:  # the next step's libraries, while this process waits on the trainer
        warmup.start(warmup.evaluate_modules(cfg))
    if cfg.model.task == "language_model":
        from modelworks import train_lm

        train_lm.fit_lm(cfg, datasets["train"], datasets["val"], pre, train_lm.lm_model_spec(cfg, pre),
                        run_dir.parent, run_dir.name, log=ctx.console)
    elif cfg.model.name == "transformer":
        from modelworks import train_text

        spec = train_text.text_model_spec(cfg, pre, "classify")
        encoder = init_encoder(cfg)
        start = ctx.value("pretrain")["encoder"] if "pretrain" in ctx.values else None
        if encoder is not None:  # the architecture is the encoder's, whatever the config says
            spec.update({k: encoder.spec[k] for k in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads",
                                                      "d_ff", "pad_id")})
            start = start or str(encoder.path)
        train_text.fit_text(cfg, "classify", datasets, pre, spec, run_dir.parent, run_dir.name,
                            init_encoder=start, log=ctx.console)
    else:
        train.fit(cfg, datasets, pre, run_dir.parent, run_dir.name, log=ctx.console)
    checkpoints = train.list_checkpoints(run_dir)
    best = train.best_checkpoint(run_dir, cfg.evaluate.metric)
    return Output(_checkpoint_value(best, checkpoints[-1][1]), [p.name for _, p in checkpoints], None,
                  _best_line(best, cfg.evaluate.metric))


# ---------------------------------------------------------------------------------------------- search
def search_detail(ctx: Context) -> str:
    return f"'{ctx.run_dir.name}', Ray Tune"


def search_step(ctx: Context) -> Output:
    from modelworks.tune.driver import search_meta, search_trials

    pre, datasets = ctx.obj("preprocess")
    outcome = search_trials(ctx.cfg, pre, datasets, ctx.run_dir, resume=ctx.options.get("resume"), log=ctx.console)
    best = outcome.best_checkpoint
    value = _checkpoint_value(best, best)
    value.update(trial=outcome.best_row["trial_id"], params=outcome.best_row["config"],
                 search=search_meta(ctx.cfg, ctx.run_dir.name, outcome), plan=outcome.plan)
    files = [str(best.relative_to(ctx.run_dir)), "trials.csv", "trials.json", "trials_val_accuracy.png"]
    return Output(value, files, outcome.rows,
                  f"best trial {outcome.best_row['trial_id']} ({best.name}, val accuracy "
                  f"{value['metrics']['val_accuracy']:.4f}), {outcome.epochs_total} epochs in all")


def trained(ctx: Context) -> dict:
    """The output of whichever of train and search ran."""
    return ctx.value("search" if "search" in ctx.values else "train")


# -------------------------------------------------------------------------------------------- evaluate
def evaluate_step(ctx: Context) -> Output:
    cfg, src = ctx.cfg, ctx.obj("ingest")
    best, eval_dir = Path(trained(ctx)["checkpoint"]), ctx.run_dir / "evaluation"
    if cfg.model.task == "language_model":
        from modelworks import evaluate_lm

        metrics = evaluate_lm.evaluate_language_model(best, src.val, eval_dir, ctx.run_dir.name)
        result = (f"val loss {metrics['val_loss']:.4f}, perplexity {metrics['val_perplexity']:.2f} "
                  f"(the whole validation text, {metrics['val_tokens']:,} tokens), {best.name}")
    else:
        from modelworks.evaluate import evaluate_checkpoint

        test = src.arrays["test"] if src.arrays is not None else src.splits["test"]
        metrics = evaluate_checkpoint(best, test, eval_dir, ctx.run_dir.name,
                                      val_split=src.splits["val"] if cfg.model.name == "transformer" else None)
        if "search" in ctx.values:  # the trial table goes with the registered version
            from modelworks.tune.driver import write_outputs

            write_outputs(ctx.obj("search"), eval_dir, f"{ctx.run_dir.name}: validation accuracy per trial")
        score = (f"test R² {metrics['test_r2']:.4f}, MAE {metrics['test_mae']:.4g}, RMSE {metrics['test_rmse']:.4g}"
                 if cfg.model.task == "regression" else f"test accuracy {metrics['test_accuracy']:.4f}")
        result = f"{score} ({metrics['test_samples']} samples), {best.name}"
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, type(None)))}
    return Output({"metrics": numbers, "report": str(eval_dir / "report.md")}, ["evaluation"], metrics, result)


def load_search(ctx: Context, value: dict) -> list[dict]:
    """The trial table of a search that finished earlier (a cache hit, or an earlier attempt of this run)."""
    rows = json.loads((ctx.run_dir / "trials.json").read_text())
    return [r | {"path": str(ctx.run_dir / r["trial_id"])} for r in rows]


# -------------------------------------------------------------------------------------------- register
def register_step(ctx: Context) -> Output:
    cfg = ctx.cfg
    source, evaluation = trained(ctx), ctx.value("evaluate")
    best, metrics = Path(source["checkpoint"]), evaluation["metrics"]
    run_ref, extra = ctx.run_dir.name, {}
    if cfg.model.task == "language_model":
        extra = {k: metrics[k] for k in ("val_loss", "val_perplexity")}
    if "search" in ctx.values:
        from modelworks.tune.space import trial_config

        run_ref = f"{ctx.run_dir.name}/{source['trial']}"
        extra = source["search"]
        cfg = trial_config(cfg, source["params"])
    extra["lineage"] = {"run": ctx.run_dir.name, "manifest": str(ctx.run_dir / "manifest.json")}
    name, version, production = register_result(cfg, run_ref, best, ctx.run_dir / "evaluation", metrics, extra)
    result = f"{name}@{version}" + (" (production)" if production else
                                    f" (production unchanged: did not pass the {cfg.registry.gate_metric} gate)")
    return Output({"model": f"{name}@{version}", "production": production}, [], None, result)


def register_still_valid(value: dict) -> bool:
    """A cached registration counts only while that version is still in the registry."""
    name, _, version = value["model"].partition("@")
    try:
        registry_mod.Registry().info(name, int(version))
        return True
    except Exception:  # noqa: BLE001 - removed, or another registry root
        return False

