"""Run a step graph: each step once its inputs are done, from the cache when nothing it reads has changed.

For each step, in the graph's order:
1. its key (pipeline/cache.py) from the config fields it reads, the data files' fingerprints (ingest), the
   upstream steps' keys and the code version;
2. a hit when this run finished the step with that key before (a rerun after a crash), or the cache holds
   the key (another run made it; its files are linked into this run); ``--no-cache`` / ``--rerun STEP``
   turn hits off for everything, or for STEP and what is downstream of it;
3. otherwise it runs: a built-in step in this process (it starts its own Ray work: Ray Data, Train, Tune),
   a user step as a Ray task with the resources it asked for, so user steps whose inputs are ready run
   while the built-in chain goes on. A step that ran is published to the cache.
The manifest (pipeline/manifest.py) records every step as it starts and ends.
"""
from __future__ import annotations

import inspect
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelworks.config import WorkflowConfig
from modelworks.errors import UserError
from modelworks.pipeline import cache as cache_mod
from modelworks.pipeline import manifest as manifest_mod
from modelworks.pipeline.graph import Graph, Step
from modelworks.pipeline.types import Context, Output


@dataclass
class RunOptions:
    no_cache: bool = False
    rerun: tuple[str, ...] = ()
    resume: bool | None = None       # search: True continue, False refuse an existing one, None either
    options: dict = field(default_factory=dict)


def config_part(cfg: WorkflowConfig, reads: tuple[str, ...]) -> dict:
    """The values of the dotted config fields a step reads."""
    whole, out = cfg.model_dump(mode="json"), {}
    for dotted in reads:
        node = whole
        for part in dotted.split("."):
            node = node[part]
        out[dotted] = node
    return out


def _user_task(fn, kwargs: dict, out_dir: str, name: str):
    """A user step's body, in a Ray task: JSON in, JSON out, files in out_dir."""
    if "out_dir" in inspect.signature(fn).parameters:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        kwargs = {**kwargs, "out_dir": Path(out_dir)}
    value = fn(**kwargs)
    try:
        json.dumps(value)
    except TypeError as err:
        raise UserError(f"step '{name}' returned {type(value).__name__}, which is not JSON ({err}); return a "
                        f"dict of numbers/strings/lists and write anything else to out_dir") from None
    return value


def _short(value) -> str:
    """A user step's value on one console line."""
    shown = json.dumps(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


class Runner:
    def __init__(self, graph: Graph, ctx: Context, run: RunOptions, cache_root: Path):
        self.graph, self.ctx, self.run = graph, ctx, run
        self.cache = cache_mod.CacheStore(cache_root)
        self.code = cache_mod.code_version()
        self.previous = {s["name"]: s for s in manifest_mod.read(ctx.run_dir).get("steps", [])}
        cfg = ctx.cfg
        self.manifest = manifest_mod.Manifest(ctx.run_dir, run=ctx.run_dir.name, workflow=cfg.name,
                                              config=cfg.model_dump(mode="json"), config_digest=cfg.digest(),
                                              code=self.code, steps=graph.order)
        self.forced = set().union(*(graph.downstream(s) for s in run.rerun)) if run.rerun else set()
        unknown = [s for s in run.rerun if s not in graph.steps]
        if unknown:
            raise UserError(f"--rerun {unknown[0]}: no such step (steps: {', '.join(graph.order)})")
        self.keys: dict[str, str] = {}
        self.inputs: dict[str, dict] = {}
        self.hits: dict[str, tuple | None] = {}
        ctx.number = {n: f"[{i}/{len(graph.order)}]" for i, n in enumerate(graph.order, start=1)}

    def plan(self) -> bool:
        """Every step's key and whether the cache (or this run's earlier attempt) has it; keys depend on
        inputs, not on outputs, so this needs nothing to run. True when every step is a hit: then the run
        needs no Ray at all."""
        for name in self.graph.order:
            s = self.graph.steps[name]
            self.inputs[name] = self._inputs(s)
            self.keys[name] = cache_mod.digest({"format": cache_mod.FORMAT, "step": name, **self.inputs[name]})
            self.hits[name] = self._hit(s, self.keys[name])
        return all(self.hits.values())

    # -- keys and hits -------------------------------------------------------------------------------
    def _inputs(self, s: Step) -> dict:
        inputs = {"config": config_part(self.ctx.cfg, s.reads) if s.builtin else self.ctx.cfg.model_dump(mode="json")
                  if "config" in inspect.signature(s.fn).parameters else {},
                  "upstream": {i: self.keys[i] for i in s.inputs}, "code": self.code["source_hash"]}
        if s.name == "ingest":
            from modelworks.pipeline.data_steps import data_files

            inputs["data"] = cache_mod.fingerprint(data_files(self.ctx.cfg, self.ctx.data_dir))
        if not s.builtin:
            inputs["step_code"] = s.code_digest()
        return inputs

    def _hit(self, s: Step, key: str) -> tuple[dict, list[str], str] | None:
        """(value, files, where) of a reusable earlier output, or None."""
        if self.run.no_cache or s.name in self.forced or not s.cache:
            return None
        before = self.previous.get(s.name)
        if before and before.get("status") == "succeeded" and before.get("key") == key and \
                all((self.ctx.run_dir / f).exists() for f in before["outputs"]["files"]):
            value, files, where = before["outputs"]["value"], before["outputs"]["files"], "this run"
        else:
            entry = self.cache.lookup(s.name, key)
            if entry is None:
                return None
            entry.restore(self.ctx.run_dir)
            value, files, where = entry.value, entry.files, f"run {entry.run}"
        if s.still_valid is not None and not s.still_valid(value):
            return None
        return value, files, where

    # -- running -------------------------------------------------------------------------------------
    def execute(self) -> Context:
        import ray

        from modelworks.pipeline.track import StepTracking

        cfg = self.ctx.cfg
        self.tracking = StepTracking(self.ctx.run_dir, workflow=cfg.name, config=cfg.model_dump(mode="json"),
                                     tags={"modelworks.run": self.ctx.run_dir.name, "config_digest": cfg.digest(),
                                           **{f"code.{k}": v for k, v in self.code.items() if v}},
                                     warn=self.ctx.console)
        pending, running = list(self.graph.order), {}
        try:
            while pending or running:
                ready = [n for n in pending if all(i in self.ctx.values for i in self.graph.steps[n].inputs)]
                for name in [n for n in ready if not self.graph.steps[n].builtin]:
                    pending.remove(name)
                    self._start_or_reuse(name, running)
                builtins_ready = [n for n in ready if self.graph.steps[n].builtin]
                if builtins_ready:  # one at a time on the driver; user tasks keep running meanwhile
                    pending.remove(builtins_ready[0])
                    self._builtin(builtins_ready[0])
                elif running:
                    done, _ = ray.wait([r for r, _ in running.values()], num_returns=1)
                    name = next(n for n, (r, _) in running.items() if r == done[0])
                    self._finish_user(name, *running.pop(name))
                elif pending:  # nothing ready, nothing running: an input never came (cannot happen in a DAG)
                    raise UserError(f"steps {', '.join(pending)} could not start")
                self._collect_finished(running)
        except BaseException as exc:
            for name in running:
                self.manifest.finish(name, status="failed", seconds=0.0, error="cancelled: another step failed")
            self.manifest.close("failed", error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            self.tracking.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        self.manifest.close("succeeded", **self._final())
        self.tracking.close("FINISHED")
        return self.ctx

    def _final(self) -> dict:
        """The run's headline for the manifest: validation metrics of the chosen checkpoint, test metrics, model."""
        values = self.ctx.values
        fit = values.get("search") or values.get("train") or {}
        metrics = {k: v for k, v in fit.get("metrics", {}).items() if k.startswith("val_")}
        metrics.update({k: v for k, v in values.get("evaluate", {}).get("metrics", {}).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return {"metrics": metrics, "model": values.get("register", {}).get("model")}

    def _track(self, name: str, value) -> None:
        rows = self.ctx.obj(name) if name == "search" else None
        self.tracking.step(name, value, self.ctx.cfg.model.task == "language_model", rows)

    def _collect_finished(self, running: dict) -> None:
        import ray

        if running:
            done, _ = ray.wait([r for r, _ in running.values()], num_returns=len(running), timeout=0)
            for ref in done:
                name = next(n for n, (r, _) in running.items() if r == ref)
                self._finish_user(name, *running.pop(name))

    def _begin(self, s: Step) -> tuple[str, dict, tuple | None]:
        if s.name not in self.keys:
            self.plan()
        key, inputs, hit = self.keys[s.name], self.inputs[s.name], self.hits[s.name]
        resources = {"cpus": s.resources.cpus, "gpus": s.resources.gpus, "memory_mb": s.resources.memory_mb}
        self.manifest.start(s.name, key=key, cache="hit" if hit else ("off" if self.run.no_cache or not s.cache
                                                                      else "miss"),
                            resources=None if s.builtin else resources, inputs=inputs, builtin=s.builtin)
        return key, inputs, hit

    def _reuse(self, s: Step, hit: tuple) -> None:
        value, files, where = hit
        self.ctx.values[s.name] = value
        self.manifest.finish(s.name, status="succeeded", seconds=0.0, outputs={"files": files, "value": value},
                             cached_from=where)
        if s.builtin:
            self.ctx.loaders[s.name] = s.load
        self._track(s.name, value)
        summary = value.get("summary", "") if s.builtin else _short(value)
        self.ctx.console.step_done(self.ctx.number[s.name], s.name, 0.0, f"cached ({where}): {summary}".rstrip(": "))

    def _builtin(self, name: str) -> None:
        s = self.graph.steps[name]
        key, _, hit = self._begin(s)
        if hit:
            return self._reuse(s, hit)
        if s.clear is not None and (self._made_for_other_inputs(name) or name in self.forced):
            s.clear(self.ctx)
        t0 = time.time()
        detail = s.detail(self.ctx) if s.detail else ""
        try:
            with self.ctx.console.step(self.ctx.number[name], name, detail, announce=bool(detail)) as line:
                out: Output = s.fn(self.ctx)
                line["result"] = out.result
        except BaseException as exc:
            self.manifest.finish(name, status="failed", seconds=time.time() - t0,
                                 error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            raise
        self.ctx.loaders[name] = s.load
        if out.obj is not None:
            self.ctx.objects[name] = out.obj
        self._done(s, key, {**out.value, "summary": out.result}, out.files, time.time() - t0)

    def _made_for_other_inputs(self, name: str) -> bool:
        """Whether this run's earlier attempt at the step read other config fields, data or upstream outputs,
        so its partial outputs (checkpoints) must not be resumed. A code change alone does not count: resuming
        after a fix is what a rerun after a crash is for."""
        before = self.previous.get(name)
        if not before or "inputs" not in before:
            return False
        strip = lambda inputs: {k: v for k, v in inputs.items() if k not in ("code", "upstream")}  # noqa: E731
        return strip(before["inputs"]) != strip(self.inputs[name]) or \
            any(self._made_for_other_inputs(u) for u in self.graph.steps[name].inputs)

    def _done(self, s: Step, key: str, value, files: list[str], seconds: float) -> None:
        self.ctx.values[s.name] = value
        self.manifest.finish(s.name, status="succeeded", seconds=seconds, outputs={"files": files, "value": value})
        if s.cache:
            self.cache.publish(s.name, key, self.ctx.run_dir, files, value)
        self._track(s.name, value)

    def _start_or_reuse(self, name: str, running: dict) -> None:
        """Start a user step as a Ray task (it joins ``running``), or reuse its cached output."""
        import ray

        s = self.graph.steps[name]
        _, _, hit = self._begin(s)
        if hit:
            return self._reuse(s, hit)
        kwargs = {i: self.ctx.values[i] for i in s.inputs}
        if "config" in inspect.signature(s.fn).parameters:
            kwargs["config"] = self.ctx.cfg.model_dump(mode="json")
        task = ray.remote(num_cpus=s.resources.cpus, num_gpus=s.resources.gpus,  # Ray
                          memory=s.resources.memory_mb * 2**20 if s.resources.memory_mb else None,
                          max_retries=0)(_user_task)
        out_dir = self.ctx.run_dir / "steps" / name
        shutil.rmtree(out_dir, ignore_errors=True)  # files of an earlier attempt are not this one's
        running[name] = (task.remote(s.fn, kwargs, str(out_dir), name), time.time())

    def _finish_user(self, name: str, ref, t0: float) -> None:
        import ray

        s = self.graph.steps[name]
        try:
            value = ray.get(ref)
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            self.manifest.finish(name, status="failed", seconds=time.time() - t0,
                                 error=f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}")
            if isinstance(cause, UserError):
                raise cause from None
            raise
        out_dir = self.ctx.run_dir / "steps" / name
        files = [f"steps/{name}"] if out_dir.is_dir() else []
        self._done(s, self.keys[name], value, files, time.time() - t0)
        self.ctx.console.step_done(self.ctx.number[name], name, time.time() - t0, f"Ray task: {_short(value)}")
