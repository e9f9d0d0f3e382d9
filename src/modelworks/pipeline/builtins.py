"""The built-in steps as data, and the default graph a workflow's config gives:

    ingest -> preprocess -> [pretrain] -> train | search -> [evaluate] -> [register]   (+ the user's steps)

``reads`` lists the config fields each step depends on: with the upstream steps' keys, the data files' and
the code's fingerprints, they make its cache key (pipeline/cache.py). A field a step does not read can
change without rerunning it: a new ``train.lr`` reruns train, evaluate and register, not ingest/preprocess.
"""
from __future__ import annotations

import shutil

from modelworks.config import WorkflowConfig
from modelworks.pipeline import data_steps, model_steps
from modelworks.pipeline.graph import Graph, Step
from modelworks.pipeline.types import Context

_TRAINER = ("model", "train", "evaluate.metric")


def _no_object(ctx: Context, value: dict) -> None:
    return None


def _clear_training(ctx: Context) -> None:
    """Checkpoints and Ray Train's snapshot of a training made for other inputs: a rerun must not resume it."""
    from modelworks.train import CKPT_RE

    for p in ctx.run_dir.iterdir():
        if CKPT_RE.match(p.name):
            shutil.rmtree(p)
    (ctx.run_dir / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)


def _clear_pretraining(ctx: Context) -> None:
    shutil.rmtree(ctx.run_dir / "pretrain", ignore_errors=True)


def _clear_search(ctx: Context) -> None:
    from modelworks.errors import UserError

    raise UserError(f"run '{ctx.run_dir.name}' holds a search made for other inputs; pass --name for a new run")


def builtin_steps(cfg: WorkflowConfig) -> list[Step]:
    """The built-in steps this config runs, in order."""
    wanted = set(cfg.steps) | {"ingest", "preprocess"}
    if not (cfg.pretrain.enabled and cfg.model.name == "transformer"):
        wanted.discard("pretrain")
    if not cfg.registry.enabled:
        wanted.discard("register")
    fit = "search" if cfg.search.enabled else "train"
    if fit == "search":  # the search trains: it stands where `train` does
        wanted = (wanted - {"train"}) | {"search"}
    steps = [
        Step("ingest", (), data_steps.ingest, True, ("data", "pretrain.corpus", "steps"),
             load=data_steps.load_ingest, about="read the data; splits materialised in the run"),
        Step("preprocess", ("ingest",), data_steps.preprocess_step, True,
             ("data", "model.task", "model.name", "model.vocab_size", "model.max_len", "train.init_from",
              "pretrain.enabled", "steps"),
             load=data_steps.load_preprocess, about="fit on the training split; preprocessed splits as Parquet"),
        Step("pretrain", ("ingest", "preprocess"), model_steps.pretrain, True,
             ("model", "pretrain", "train.workers", "train.use_gpu", "train.max_failures", "train.random_seed", "name",
              "registry", "steps"),
             load=_no_object, detail=model_steps.pretrain_detail, clear=_clear_pretraining,
             about="masked-language modelling; the encoder is registered"),
        Step("train", ("preprocess", "pretrain") if "pretrain" in wanted else ("preprocess",),
             model_steps.train_step, True, _TRAINER, load=_no_object, detail=model_steps.train_detail,
             clear=_clear_training, about="Ray Train; the best checkpoint by " + cfg.evaluate.metric),
        Step("search", ("preprocess",), model_steps.search_step, True, (*_TRAINER, "search"),
             load=model_steps.load_search, detail=model_steps.search_detail, clear=_clear_search,
             about="Ray Tune; the best trial's best checkpoint"),
        Step("evaluate", ("ingest", fit), model_steps.evaluate_step, True, ("evaluate", "model.task"),
             load=_no_object, about="test metrics, report"),
        Step("register", (fit, "evaluate"), model_steps.register_step, True,
             ("registry", "name", "evaluate.metric"), load=_no_object, still_valid=model_steps.register_still_valid,
             about="registry version; production moves through the gate"),
    ]
    return [s for s in steps if s.name in wanted]


def default_graph(cfg: WorkflowConfig, user: list[Step] = ()) -> Graph:
    return Graph(builtin_steps(cfg) + list(user))
