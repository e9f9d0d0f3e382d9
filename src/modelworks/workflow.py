"""``run_workflow``: a workflow config (and the user's steps) as a step graph, run by pipeline/runner.py.

One typed function that the CLI, the search CLI and the tests all call. The graph is the config's built-in
steps (pipeline/builtins.py: ingest -> preprocess -> [pretrain] -> train|search -> evaluate -> register) plus
any ``@step`` functions of the workflow file. Each step's output lives in the run folder, is kept in the
step cache, and is recorded in the run's manifest:

    runs/<run>/manifest.json         lineage: every step's inputs, key, cache hit or miss, outputs
    runs/<run>/data/, preprocess/    the ingest and preprocess steps' outputs (pipeline/data_steps.py)
    runs/<run>/checkpoint_epoch=N    the train step (checkpoint_step=N for a language model)
    runs/<run>/pretrain/checkpoint_epoch=N   the pre-training step (text)
    runs/<run>/<trial_id>/           the search step's trials
    runs/<run>/evaluation/           report.md, metrics, plots
    runs/<run>/steps/<name>/         a user step's files
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import ray

from modelworks import registry as registry_mod
from modelworks import warmup
from modelworks.config import WorkflowConfig
from modelworks.console import Console
from modelworks.errors import UserError
from modelworks.pipeline.builtins import default_graph
from modelworks.pipeline.graph import Step
from modelworks.pipeline.runner import RunOptions, Runner
from modelworks.pipeline.types import Context
from modelworks.runtime import alive_nodes, ensure_ray, runs_root  # noqa: F401 - also imported from here by benches and tests
from modelworks.steps import model_name
from modelworks.tune.driver import check_search


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
    steps: dict = field(default_factory=dict)   # step -> whether it finished, in run order
    cache: dict = field(default_factory=dict)   # step -> "hit" | "miss" | "off" (the manifest has the rest)


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
    nodes = alive_nodes()
    gpus = f", {resources['GPU']:g} GPUs" if resources.get("GPU") else ""
    return f"{how}: {nodes} node(s), {resources.get('CPU', 0):g} CPUs{gpus}"


def run_workflow(cfg: WorkflowConfig, *, run_name: str | None = None, data_dir: str | None = None,
                 log: Console | Callable[[str], None] = print, user_steps: list[Step] = (),
                 no_cache: bool = False, rerun: tuple[str, ...] = (), resume: bool | None = None) -> RunResult:
    """Run (or resume) the workflow; the same name reruns only what did not finish or what changed."""
    return execute(cfg, run_name=run_name, data_dir=data_dir, log=log, user_steps=user_steps,
                   options=RunOptions(no_cache=no_cache, rerun=tuple(rerun), resume=resume))[0]


def execute(cfg: WorkflowConfig, *, run_name: str | None, data_dir: str | None, log, user_steps: list[Step],
            options: RunOptions) -> tuple[RunResult, Context]:
    """``run_workflow`` that also returns the steps' outputs (the search CLI reads the trial table)."""
    console = Console.from_log(log)
    t0 = time.time()
    if cfg.search.enabled:
        from modelworks.tune.space import search_name

        run_name = run_name or search_name(cfg)
    run_name = run_name or default_run_name(cfg)
    run_dir = runs_root() / run_name
    graph = default_graph(cfg, list(user_steps))  # a bad user step stops here, before Ray starts
    if cfg.search.enabled:
        check_search(cfg, run_dir, options.resume, before_ray=True)
    _claim_run_dir(run_dir, cfg)
    console.attach_run(run_dir)  # with the CLI: Ray's output goes to run_dir/logs from here on
    ctx = Context(cfg, run_dir, data_dir, console, options={"resume": options.resume})
    runner = Runner(graph, ctx, options, registry_mod.home() / "cache")
    if runner.plan():
        ray_desc = "Ray not started: every step is cached"
    else:
        warmup.start(warmup.ingest_modules(cfg))  # while Ray starts
        with console.timed("ray start"):
            how = ensure_ray()
        if cfg.search.enabled:
            check_search(cfg, run_dir, options.resume, before_ray=False)  # a trial that can never fit: now
        ray_desc = describe_ray(how)
    registers = f"registers as '{model_name(cfg)}'" if "register" in graph.steps else "registers nothing"
    console.header(f"{cfg.name} ({registers})", run_name, ray_desc, cfg.train.workers)
    runner.execute()
    result = _result(cfg, ctx, graph, t0, runner.manifest.data["steps"])
    (run_dir / "run_summary.json").write_text(result_json(result, indent=2))
    return result, ctx


def _result(cfg: WorkflowConfig, ctx: Context, graph, t0: float, recorded: list[dict]) -> RunResult:
    fit = ctx.values["search" if "search" in ctx.values else "train"]
    best, best_metrics = fit["checkpoint"], fit["metrics"]
    metrics = ctx.values.get("evaluate", {}).get("metrics", {})
    regression, language_model = cfg.model.task == "regression", cfg.model.task == "language_model"
    registered = ctx.values.get("register", {})
    production = bool(registered) and _holds_production(registered["model"])
    run = f"{ctx.run_dir.name}/{fit['trial']}" if "trial" in fit else ctx.run_dir.name
    return RunResult(run, str(ctx.run_dir), best, None if language_model else best_metrics.get("val_accuracy"),
                     metrics.get("test_accuracy", None if regression or language_model else float("nan")),
                     registered.get("model", ""), str(ctx.run_dir / "evaluation" / "report.md"), production,
                     round(time.time() - t0, 1), cfg.model.task, best_metrics.get("val_r2"), metrics.get("test_r2"),
                     metrics.get("test_mae"), metrics.get("test_rmse"),
                     step_seconds={k: round(v, 2) for k, v in ctx.console.step_seconds.items()},
                     trainer_startup_s=ctx.console.trainer_startup_s, val_loss=metrics.get("val_loss"),
                     val_perplexity=metrics.get("val_perplexity"),
                     steps={n: ctx.values.get(n) is not None for n in graph.order},
                     cache={s["name"]: s.get("cache") for s in recorded})


def _holds_production(ref: str) -> bool:
    name, _, version = ref.partition("@")
    return "production" in registry_mod.Registry().info(name, int(version)).get("aliases", [])


def result_json(result: RunResult, indent: int | None = None) -> str:
    return json.dumps(asdict(result), indent=indent)
