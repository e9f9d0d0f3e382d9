"""Ray Tune over the train loop: ASHA on `epoch`, resource-aware concurrency, best trial -> registry.

A trial is a Tune class trainable that runs the *same* ``train.train_loop`` the plain run uses:

- 1 training worker: the loop runs in a thread of the trial actor, under Ray Train's local-mode function
  utilities (like ``ScalingConfig(num_workers=0)``) whose ``report`` hands each epoch to Tune in lock-step.
  Nothing outlives the trial actor, so a trial stopped by ASHA releases all it held. (The documented Train V2
  pattern - a Tune function that nests a ``TorchTrainer`` - hung on 2 cores: a stopped trial left its Train
  workers behind, ray-project/ray#54305; see docs/ray-notes.md.)
- N > 1 workers: the trial actor runs a real ``TorchTrainer`` (DDP over N workers) and forwards each
  ``checkpoint_epoch=N`` it writes; the controller and workers are owned by the trial actor and die with it.

CPUs are budgeted from ``ray.cluster_resources()`` minus ``train.DATA_CPUS`` (kept for Ray Data); a trial
that can never fit fails before anything starts. 1-worker trials all run together on fractional CPU shares
(capped by memory) and wait for each other at ASHA's rungs, so ASHA compares a rung's trials with each other
(see plan_trials and ModelworksTrial._wait_at_rung). The best trial (by validation accuracy, never test) is
evaluated on the test split and registered through the workflow's gate.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from modelworks.config import WorkflowConfig, validate
from modelworks.errors import UserError

TRIAL_TABLE_COLUMNS = ("trial_id", "status", "epochs", "best_val_accuracy", "best_epoch", "last_val_accuracy",
                       "attempts", "seconds", "started_at", "ended_at")


# ------------------------------------------------------------------------------------------- the space
def tune_domain(spec: Any):
    """A config domain spec (see config.SPACE_KINDS) -> a Ray Tune domain; scalars stay constants."""
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


# ---------------------------------------------------------------------------------------- resources
@dataclass
class TrialPlan:
    total_cpus: float
    workers: int              # training workers per trial (the largest a trial may ask for)
    cpus_per_worker: float
    trial_cpus: float         # what one trial holds in all
    concurrency: int
    threads: int              # torch threads per worker
    why: str = ""             # what set the concurrency (logged with the plan)

    def describe(self) -> str:
        return (f"{self.concurrency} concurrent trial(s) x {self.workers} worker(s) x {self.cpus_per_worker:g} CPU "
                f"on {self.total_cpus:g} CPUs ({_data_cpus():g} kept for Ray Data), {self.threads} torch thread(s)"
                + (f"; {self.why}" if self.why else ""))


def _data_cpus() -> float:
    from modelworks.train import DATA_CPUS

    return DATA_CPUS


# The trial actor of a multi-worker trial only waits on its TorchTrainer: a sliver of a CPU
# (0 is refused by Tune: "empty head").
DRIVER_CPUS = 0.01
# The smallest CPU share a training worker may ask for (below it a time-sliced trial crawls).
MIN_WORKER_CPUS = 0.1
# Memory of one training process besides its data: Python + torch + Ray worker (~0.5 GB RSS; rounded up).
PROCESS_BYTES = 700 * 2**20


def trial_memory_bytes(workers: int, data_bytes: int) -> int:
    """Rough peak memory of one trial: a process per worker plus 4x the data it reads: the object-store pages
    it maps, the batches, and (``cache_on_worker``) its shard as tensors, briefly twice while concatenating.
    Measured: an MNIST trial actor (190 MB of preprocessed train+val) peaks at ~1.44 GB RSS; this gives 1.45."""
    return workers * PROCESS_BYTES + 4 * int(data_bytes)


def _floor4(x: float) -> float:
    """Round a CPU share down to Ray's resource granularity, so `concurrency` shares never exceed the budget."""
    return math.floor(x * 10_000 + 1e-6) / 10_000


def plan_trials(cfg: WorkflowConfig, resources: dict[str, float] | None = None,
                physical_cpus: int | None = None, local: bool = True,
                trial_bytes: int | None = None) -> TrialPlan:
    """Per-trial resources and concurrency from the cluster's resources, always leaving DATA_CPUS free.

    Concurrency (1-worker trials): ASHA needs peers at a rung. It stops a trial that reports below the
    (1 - 1/reduction_factor) quantile of the results *already recorded* at that rung, and the first trial to
    reach a rung always continues. Run one at a time (what whole CPUs allow on a 2-core machine), every trial
    is judged only against its predecessors, the first (often poor) one sets the bar at every rung and nearly
    all later ones clear it (measured: 142 of 160 epochs used on digits). So by default *all* trials run
    together, each on a fractional share of the free CPUs with 1 torch thread (the OS time-slices them; total
    compute is the same), and they reach each rung at about the same time, as ASHA assumes. The cap:
    search.max_concurrent (override), the CPUs (>= MIN_WORKER_CPUS each, or search.cpus_per_trial each) and
    memory (``trial_bytes`` per trial, see trial_memory_bytes, against the cluster's ``memory`` resource).

    Multi-worker trials keep whole-CPU budgeting: their DDP workers synchronise every step, and time-slicing
    several worker groups on the same cores would stall every all-reduce on a descheduled rank.

    Raises UserError at once when a trial could never be scheduled (instead of Tune waiting forever).
    """
    import ray

    res = resources if resources is not None else ray.cluster_resources()
    total = float(res.get("CPU", 0.0))
    free = total - _data_cpus()
    workers = max(int(w) for w in possible_values(cfg, "train.workers"))
    use_gpu = any(bool(g) for g in possible_values(cfg, "train.use_gpu"))
    s = cfg.search
    if free <= 0:
        raise UserError(f"the Ray cluster has {total:g} CPUs; a search needs more than {_data_cpus():g} "
                        f"(kept for Ray Data): start Ray with more CPUs")
    if use_gpu and res.get("GPU", 0.0) < workers:
        raise UserError(f"a trial asks for {workers} GPU worker(s) but the cluster has {res.get('GPU', 0.0):g} GPUs; "
                        f"set train.use_gpu=false or add GPUs")
    mem_cap = None
    if trial_bytes and res.get("memory"):
        mem_cap = max(1, int(res["memory"] // trial_bytes))
    caps = {"trials": s.num_samples}
    if s.max_concurrent:
        caps["search.max_concurrent"] = s.max_concurrent
    if mem_cap is not None:
        caps[f"memory ({res['memory'] / 2**30:.1f} GiB / {trial_bytes / 2**30:.2f} GiB per trial)"] = mem_cap
    if workers == 1 and not s.cpus_per_trial:
        caps[f"CPUs (>= {MIN_WORKER_CPUS:g} each)"] = max(1, int(math.floor(free / MIN_WORKER_CPUS + 1e-9)))
        concurrency = min(caps.values())
        # A fractional share when the trials outnumber the free CPUs; never more than 1 CPU by default, so a
        # trial fits on any node (search.cpus_per_trial asks for more).
        per_worker = _floor4(min(1.0, free / concurrency))
        need = per_worker
    else:
        if workers == 1:
            per_worker = s.cpus_per_trial
            need = per_worker
        else:
            per_worker = (s.cpus_per_trial / workers) if s.cpus_per_trial else \
                _floor4(min(1.0, (free - DRIVER_CPUS) / workers))
            need = per_worker * workers + DRIVER_CPUS
        if need > free + 1e-9 or per_worker < MIN_WORKER_CPUS - 1e-9:
            raise UserError(f"a trial asks for {workers} worker(s) x {per_worker:.2g} CPU (+ driver) = {need:.3g} "
                            f"CPUs, but the cluster has {total:g} CPUs with {_data_cpus():g} kept for Ray Data, so "
                            f"it could never start; lower train.workers / search.cpus_per_trial or add CPUs")
        caps["CPUs"] = max(1, int(math.floor(free / need + 1e-9)))
        concurrency = min(caps.values())
    physical = physical_cpus or os.cpu_count() or 1
    threads = max(1, physical // (concurrency * workers)) if local else max(1, int(per_worker))
    limit = min(caps, key=lambda k: caps[k])
    why = f"concurrency limited by {limit}"
    if concurrency < s.num_samples and s.scheduler == "asha":
        why += " (fewer concurrent trials than samples: ASHA judges later trials against earlier ones only)"
    return TrialPlan(total, workers, round(per_worker, 4), round(need, 4), concurrency, threads, why)


# ------------------------------------------------------------------------------------------- pacing
def asha_rungs(cfg: WorkflowConfig) -> list[int]:
    """The epochs at which ASHA judges a trial (grace_period * reduction_factor**k below max_epochs)."""
    s = cfg.search
    if s.scheduler != "asha":
        return []
    top, rung, out = max_epochs(cfg), min(s.grace_period, max_epochs(cfg)), []
    while rung < top:
        out.append(rung)
        rung *= s.reduction_factor
    return out


# A trial waits at most this long at a rung for peers that stopped reporting (a crashed peer on another node).
PACE_TIMEOUT_S = 600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours
        return True
    return True


def attempts_path(search_dir: Path, trial_id: str) -> Path:
    """Each trial's own log of events (start, epoch, end, ...), one JSON object a line."""
    return search_dir / "attempts" / f"{trial_id}.jsonl"


def read_attempts(path: Path) -> list[dict]:
    """The events in one attempts file, in order; a half-written line (being written now, or left by a
    killed process) is skipped."""
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def peers_behind(search_dir: Path, session: str, me: str, epoch: int) -> list[str]:
    """Trials of this driver session that are running (started, not ended, process alive) and have not yet
    reported `epoch`. Trials not started yet (beyond the concurrency cap) are not waited for."""
    behind = []
    for f in (search_dir / "attempts").glob("*.jsonl"):
        trial = f.stem
        if trial == me:
            continue
        started = ended = False
        pid = host = None
        events = read_attempts(f)
        reached = reported_epoch(events)
        for e in events:
            if e.get("session") == session:
                if e["event"] == "start":
                    started, ended, pid, host = True, False, e.get("pid"), e.get("host")
                elif e["event"] == "end":
                    ended = True
        alive = started and not ended and not (host == socket.gethostname() and pid and not _pid_alive(pid))
        if alive and reached < epoch:
            behind.append(trial)
    return behind


# ------------------------------------------------------------------------------------------ the trial
class _Stopped(BaseException):
    """Raised inside the training thread when Tune stops the trial (BaseException: train_loop must not catch it)."""


def _bridge_utils(experiment: str, datasets: dict, resume_dir: str | None, on_report: Callable):
    """Ray Train's local-mode function utilities, with `report` forwarded to the trial (lock-step)."""
    import ray.train
    from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils

    class _TuneBridge(LocalTrainFnUtils):
        def report(self, metrics, checkpoint=None, checkpoint_dir_name=None, **_kw):
            self._last_metrics = metrics
            on_report(metrics, checkpoint, checkpoint_dir_name)

    utils = _TuneBridge(experiment_name=experiment, dataset_shards=datasets)
    if resume_dir:
        utils._last_checkpoint = ray.train.Checkpoint.from_directory(resume_dir)
    return utils


def _trainable_class():
    from ray import tune

    class ModelworksTrial(tune.Trainable):
        """One search trial: `train.train_loop` for one set of sampled hyperparameters, one epoch per step."""

        def setup(self, config, base=None, pre_json=None, datasets=None, plan=None, search_dir=None,
                  session=""):
            self.cfg = trial_config(WorkflowConfig.model_validate(base), config)
            self.pre_json, self.datasets, self.plan = pre_json, datasets, TrialPlan(**plan)
            self.search_dir = Path(search_dir)
            # This trial's epoch checkpoints (checkpoint_epoch=N, complete ones carry sha256sums), kept on the
            # storage path by the trial itself, so a resume finds the newest one whatever Tune's saved state
            # says (tune_state.py). Tune keeps no checkpoint of its own.
            self.run_dir = (self.search_dir / "train" / self.trial_id if self.cfg.train.workers > 1
                            else self.search_dir / self.trial_id)
            self.last_metrics: dict | None = None
            self.resume_dir: str | None = None
            self.thread: threading.Thread | None = None
            self.to_tune: queue.Queue = queue.Queue()
            self.to_train: queue.Queue = queue.Queue()
            self.started = time.time()
            self.epochs_trained = 0
            self.session = session
            self.rungs = set(asha_rungs(self.cfg)) if self.cfg.train.workers == 1 else set()
            # Tune saves its experiment state every few seconds: a trial that ended just before the driver
            # was killed can come back on --resume. Its own log says it ended: it must not run again.
            self.ended_before = self._has_ended()
            self._adopt_newest()
            if not self.ended_before:
                self._log_attempt({"event": "start", "pid": os.getpid(), "host": socket.gethostname(),
                                   "session": session})
                if self.last_metrics:
                    self._log_attempt({"event": "resume", "from_epoch": self.last_metrics["epoch"]})

        def _adopt_newest(self) -> None:
            """Go on from the newest complete checkpoint this trial wrote (an earlier attempt's, on --resume)."""
            from modelworks import train

            done = train.list_checkpoints(self.run_dir)
            if done:
                ckpt = done[-1][1]
                self.last_metrics = {k: v for k, v in json.loads((ckpt / "metrics.json").read_text()).items()
                                     if k != "history"}
                if self.cfg.train.workers == 1:  # (a TorchTrainer resumes from its own run directory)
                    self.resume_dir = str(ckpt)

        def _has_ended(self) -> bool:
            return any(e.get("event") == "end" for e in read_attempts(attempts_path(self.search_dir, self.trial_id)))

        # -- bookkeeping visible to the trial table and to resume checks
        def _log_attempt(self, record: dict) -> None:
            path = attempts_path(self.search_dir, self.trial_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"time": time.time(), **record}) + "\n"
            with path.open("ab+") as f:  # writes append; reads go anywhere
                end = f.seek(0, os.SEEK_END)
                if end:
                    f.seek(end - 1)
                    if f.read(1) != b"\n":  # an attempt killed mid-line: start afresh, or this record is glued to it
                        line = "\n" + line
                f.write(line.encode())

        def _loop_config(self) -> dict:
            return {"config": self.cfg.model_dump(mode="json"), "preprocessor": self.pre_json,
                    "threads": self.plan.threads}

        # -- 1 worker: the loop in this process, lock-step with Tune
        def _on_report(self, metrics, checkpoint, dir_name) -> None:
            if checkpoint is not None:  # train_loop deletes its temp dir after report: persist it now
                target = self.run_dir / (dir_name or f"checkpoint_epoch={metrics['epoch']}")
                tmp = self.run_dir / f".tmp-{target.name}"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(checkpoint.path, tmp)
                shutil.rmtree(target, ignore_errors=True)  # an epoch trained again after a resume
                tmp.rename(target)  # whole or absent, never half-written
            self.to_tune.put(("report", dict(metrics)))
            if self.to_train.get() == "stop":
                raise _Stopped()

        def _run_local(self) -> None:
            from ray.train.v2._internal.execution.train_fn_utils import set_train_fn_utils

            from modelworks import train

            try:
                set_train_fn_utils(_bridge_utils(self.trial_id, self.datasets, self.resume_dir, self._on_report))
                train.train_loop(self._loop_config())
                self.to_tune.put(("finished", None))
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to Tune as the trial's error
                self.to_tune.put(("error", exc))

        # -- N workers: a real TorchTrainer; forward each checkpoint_epoch=N it writes
        def _run_distributed(self) -> None:
            from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

            from modelworks import train

            try:
                _abortable_trainer(self)(
                    train.train_loop, train_loop_config=self._loop_config(),
                    datasets={"train": self.datasets["train"], "val": self.datasets["val"]},
                    scaling_config=ScalingConfig(num_workers=self.cfg.train.workers, use_gpu=self.cfg.train.use_gpu,
                                                 resources_per_worker={"CPU": self.plan.cpus_per_worker}),
                    run_config=RunConfig(name=self.trial_id, storage_path=str(self.search_dir / "train"),
                                         failure_config=FailureConfig(max_failures=self.cfg.train.max_failures),
                                         checkpoint_config=CheckpointConfig(num_to_keep=None)),
                ).fit()
                self.to_tune.put(("finished", None))
            except BaseException as exc:  # noqa: BLE001
                self.to_tune.put(("error", exc))

        def _next_distributed(self):
            from modelworks import train

            last = self.last_metrics["epoch"] if self.last_metrics else 0

            def newer():
                found = [(e, p) for e, p in train.list_checkpoints(self.run_dir) if e > last]
                return ("report", json.loads((found[0][1] / "metrics.json").read_text())) if found else None

            while True:
                item = newer()
                if item:
                    return item
                if not self.thread.is_alive():
                    return newer() or self.to_tune.get()  # the thread always leaves one item when it ends
                time.sleep(0.2)

        def step(self):
            if self.ended_before:  # restored after it had already ended: report where it stopped, run nothing
                last = self.last_metrics or {"epoch": 0}
                return {**{k: v for k, v in last.items() if isinstance(v, (int, float))}, "done": True}
            distributed = self.cfg.train.workers > 1
            if self.thread is None:
                self.thread = threading.Thread(target=self._run_distributed if distributed else self._run_local,
                                               daemon=True, name="modelworks-train")
                self.thread.start()
            elif not distributed:
                self.to_train.put("go")
            kind, payload = self._next_distributed() if distributed else self.to_tune.get()
            if kind == "error":
                raise payload
            if kind == "finished":  # resumed after its last epoch: nothing left to train
                return {**(self.last_metrics or {"epoch": max_epochs(self.cfg)}), "done": True}
            self.last_metrics = payload
            self.epochs_trained += 1
            self._log_attempt({"event": "epoch", "epoch": payload["epoch"]})
            if payload["epoch"] in self.rungs:
                self._wait_at_rung(payload["epoch"])
            metrics = {k: v for k, v in payload.items() if isinstance(v, (int, float))}
            done = payload["epoch"] >= self.cfg.train.epochs
            if done and distributed:  # let the TorchTrainer tear its worker group down before Tune ends us
                self.thread.join(timeout=120)
            return {**metrics, "done": done}

        def _wait_at_rung(self, epoch: int) -> None:
            """Hold this rung's result until every running peer has reported the rung too.

            ASHA judges a result against those already recorded at its rung, and the first one always passes.
            Trials differ in speed (start-up order, batch size), so without this the fastest trial is first at
            every rung and a slow good trial is judged against few peers. Holding the result until the running
            peers catch up makes the rung's results reach ASHA together (in no systematic order), which is the
            comparison ASHA is designed for. A trial only waits for trials that are running and behind it;
            the held trial's CPU share goes to those, so no compute is lost.
            """
            deadline = time.time() + PACE_TIMEOUT_S
            while peers_behind(self.search_dir, self.session, self.trial_id, epoch):
                if time.time() > deadline:
                    self._log_attempt({"event": "pace_timeout", "epoch": epoch})
                    return
                time.sleep(0.2)

        # Tune still saves a trial at its end and restores from that: both are empty, as the trial keeps its
        # own checkpoints (run_dir) and setup already went on from the newest of them.
        def save_checkpoint(self, checkpoint_dir):
            return None

        def load_checkpoint(self, checkpoint):
            pass

        def cleanup(self):
            if self.ended_before:
                return
            if self.thread is not None and self.thread.is_alive():
                if self.cfg.train.workers == 1:
                    self.to_train.put("stop")
                elif getattr(self, "controller", None) is not None:
                    # Stopped by ASHA mid-run: abort the nested Train run, or its workers outlive this trial
                    # and hold their CPUs forever (ray-project/ray#54305).
                    import ray

                    try:
                        ray.get(self.controller.abort.remote(), timeout=60)
                    except Exception:  # noqa: BLE001 - abort ends the controller; its call may report that
                        pass
                self.thread.join(timeout=30)
            self._log_attempt({"event": "end", "epochs_trained": self.epochs_trained,
                               "last_epoch": (self.last_metrics or {}).get("epoch", 0)})

    return ModelworksTrial


def _abortable_trainer(owner):
    """TorchTrainer that hands its controller actor to `owner` (Train only does that on the main thread, for
    its SIGINT handler), so a trial stopped by Tune can abort its nested Train run."""
    import ray
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api import data_parallel_trainer as dpt

    class _AbortableTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_init_kwargs):  # mirrors Ray 2.60's own
            env_vars = dpt.get_env_vars_to_propagate()
            env_vars.setdefault(dpt.RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                                dpt.DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
            controller = ray.remote(
                num_cpus=0,
                label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
                runtime_env={"env_vars": env_vars},
            )(dpt.TrainController).remote(**controller_init_kwargs)
            owner.controller = controller
            ray.get(controller.run.remote())
            return ray.get(controller.get_result.remote())

    return _AbortableTorchTrainer


# ------------------------------------------------------------------------------------------ the search
@dataclass
class SearchResult:
    search: str
    search_dir: str
    trials: list[dict]
    best_trial: str
    best_params: dict
    best_checkpoint: str
    val_accuracy: float
    test_accuracy: float
    epochs_total: int
    model: str
    production: bool
    report: str
    plan: str
    seconds: float
    run: str = ""
    extra: dict = field(default_factory=dict)


def _sorted_params(cfg: WorkflowConfig) -> dict:
    return {k: tune_domain(v) for k, v in sorted(cfg.search.space.items())}


def _trial_table(results, search_dir: Path, epochs_max: int) -> list[dict]:
    rows = []
    for r in results:
        trial_id = r.metrics.get("trial_id") if r.metrics else None
        trial_id = trial_id or Path(r.path).name
        events = read_attempts(attempts_path(search_dir, trial_id))
        # The history comes from the newest checkpoint the trial reported, which it wrote itself; Tune's
        # progress log, copied in the background, may miss epochs after a killed driver.
        saved = trial_checkpoints(Path(r.path), upto=reported_epoch(events))
        df = r.metrics_dataframe
        history = []
        if saved:
            newest = json.loads((saved[-1][1] / "metrics.json").read_text())
            history = [(int(h["epoch"]), float(h["val_accuracy"])) for h in newest.get("history", [])]
        elif df is not None and {"epoch", "val_accuracy"} <= set(df.columns):
            history = [(int(e), float(a)) for e, a in zip(df["epoch"], df["val_accuracy"])]
        epochs = max((e for e, _ in history), default=0)
        best_e, best_a = max(history, key=lambda t: (t[1], -t[0])) if history else (0, float("nan"))
        status = "error" if r.error else ("completed" if epochs >= epochs_max else "stopped")
        rows.append({
            "trial_id": trial_id, "status": status, "epochs": epochs,
            "best_val_accuracy": best_a, "best_epoch": best_e,
            "last_val_accuracy": history[-1][1] if history else float("nan"),
            "attempts": sum(1 for e in events if e["event"] == "start"),
            # Unix times the trial's first attempt started and its last one ended: concurrent trials overlap.
            "started_at": min((e["time"] for e in events if e["event"] == "start"), default=None),
            "ended_at": max((e["time"] for e in events if e["event"] in ("end", "epoch")), default=None),
            "seconds": round(float(r.metrics.get("time_total_s", 0.0)) if r.metrics else 0.0, 1),
            "config": {k: (v.item() if hasattr(v, "item") else v) for k, v in (r.config or {}).items()},
            "history": history, "path": r.path,
        })
    return sorted(rows, key=lambda x: x["trial_id"])


def reported_epoch(events: list[dict]) -> int:
    """The last epoch a trial reported to Tune (or went on from after a resume), from its attempts log."""
    return max([e["epoch"] for e in events if e["event"] == "epoch"]
               + [e["from_epoch"] for e in events if e["event"] == "resume"], default=0)


def trial_checkpoints(trial_dir: Path, upto: int | None = None) -> list[tuple[int, Path]]:
    """A trial's complete epoch checkpoints by epoch: beside its Tune files (1 worker) or in its Train run
    (N workers). `upto`: only epochs reported to Tune (a Train run stopped by ASHA may have written more)."""
    from modelworks.train import list_checkpoints

    found = list_checkpoints(trial_dir) + list_checkpoints(trial_dir.parent / "train" / trial_dir.name)
    return sorted(c for c in found if upto is None or c[0] <= upto)


def _best_checkpoint(rows: list[dict]) -> tuple[dict, Path]:
    """The best epoch checkpoint over all trials by validation accuracy (then lower val loss, earlier epoch)."""
    scored = []
    for row in rows:
        for _, ckpt in trial_checkpoints(Path(row["path"]), upto=row["epochs"]):
            m = json.loads((ckpt / "metrics.json").read_text())
            scored.append((m["val_accuracy"], -m["val_loss"], -m["epoch"], row["trial_id"], ckpt))
    if not scored:
        raise UserError("the search finished without any checkpoint (every trial failed?); see the trial table")
    best = max(scored, key=lambda t: t[:4])
    return next(r for r in rows if r["trial_id"] == best[3]), best[4]


def write_outputs(rows: list[dict], out: Path, title: str) -> None:
    """trials.csv, trials.json and trials_val_accuracy.png in `out`."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r["config"]})
    with (out / "trials.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(TRIAL_TABLE_COLUMNS) + [f"config.{k}" for k in keys])
        for r in rows:
            w.writerow([r[c] for c in TRIAL_TABLE_COLUMNS] + [json.dumps(r["config"].get(k)) for k in keys])
    (out / "trials.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "path"} for r in rows],
                                                indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["history"]:
            ax.plot([e for e, _ in r["history"]], [a for _, a in r["history"]], marker="o", markersize=3,
                    label=f"{r['trial_id']} ({r['status']})")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "trials_val_accuracy.png", dpi=100)
    plt.close(fig)


def run_search(cfg: WorkflowConfig, *, name: str | None = None, data_dir: str | None = None,
               resume: bool | None = None, register: bool = True,
               log: Callable[[str], None] = print) -> SearchResult:
    """Run (or resume) the workflow's search, evaluate the best trial on test, register it through the gate.

    resume: True continues an interrupted search, False refuses to touch an existing one, None (the
    `modelworks run` behaviour: same name = resume) continues when one exists.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from modelworks import tune_state, workflow
    from modelworks.data import sources
    from modelworks.evaluate import evaluate_checkpoint

    t0 = time.time()
    if not cfg.search.space:
        raise UserError("search.space is empty: declare at least one dimension, e.g. "
                        "--set 'search.space.lr={\"loguniform\": [1e-4, 1e-2]}'")
    workflow.ensure_ray()
    name = name or search_name(cfg)
    root = workflow.runs_root()
    search_dir = root / name
    epochs_max = max_epochs(cfg)
    plan = plan_trials(cfg, local=_ray_is_local())  # fails fast, before any data is read
    # Save Tune's experiment state after every step, so a killed driver loses no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")

    exists = tune.Tuner.can_restore(str(search_dir))
    if exists and resume is False:
        raise UserError(f"search '{name}' already exists ({search_dir}); pass --resume to continue it "
                        f"(finished trials are kept) or --name to start another")
    saved = search_dir / "workflow_config.json"
    if exists and saved.is_file() and json.loads(saved.read_text()) != cfg.model_dump(mode="json"):
        raise UserError(f"search '{name}' exists with a different config ({saved}); use --name for a new one")

    log(f"[1/5] ingest: {cfg.data.source} '{cfg.data.name}'")
    src = sources.load_source(cfg.data, data_dir)
    log("[2/5] preprocess: fitting on the training split")
    pre = workflow.fit_preprocessor(cfg, src, log)
    # Read and preprocess once for every trial: the trials iterate in-memory blocks.
    datasets = {s: pre.apply(src.splits[s]).materialize() for s in ("train", "val")}
    # Now that the data's size is known, cap the concurrency by memory too (every trial caches its shard).
    data_bytes = sum(int(d.size_bytes() or 0) for d in datasets.values())
    plan = plan_trials(cfg, local=_ray_is_local(), trial_bytes=trial_memory_bytes(plan.workers, data_bytes))

    log(f"[3/5] search '{name}': {cfg.search.num_samples} trials x up to {epochs_max} epochs, "
        f"{cfg.search.scheduler.upper()}, {plan.describe()}" + (" (resuming)" if exists and resume is not False else ""))
    search_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    trainable = tune.with_resources(
        tune.with_parameters(_trainable_class(), base=cfg.model_dump(mode="json"), pre_json=pre.to_json(),
                             datasets=datasets, plan=asdict(plan), search_dir=str(search_dir),
                             session=f"{os.getpid()}-{time.time():.3f}"),
        {"cpu": plan.trial_cpus if plan.workers == 1 else DRIVER_CPUS})
    if exists:
        tune_state.restore_mirror(search_dir)  # Tune's own copy may be torn by the kill; ours is whole
        tuner = tune.Tuner.restore(str(search_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        metric = cfg.evaluate.metric
        if cfg.search.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="epoch", metric=metric, mode="max", max_t=epochs_max,
                                      grace_period=min(cfg.search.grace_period, epochs_max),
                                      reduction_factor=cfg.search.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space=_sorted_params(cfg),
            tune_config=tune.TuneConfig(
                num_samples=cfg.search.num_samples, scheduler=scheduler,
                # The concurrency limit lives in the generator (Tune ignores max_concurrent_trials with it).
                search_alg=BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=plan.concurrency),
                reuse_actors=False,
                trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(
                name=name, storage_path=str(root),
                stop={"epoch": epochs_max},
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[tune_state.StateMirror(str(search_dir))],
                verbose=0,
            ),
        )
    grid = tuner.fit()

    rows = _trial_table(list(grid), search_dir, epochs_max)
    write_outputs(rows, search_dir, f"{name}: validation accuracy per trial")
    for r in rows:
        log(f"      {r['trial_id']}: {r['status']:<9} {r['epochs']:>2} epochs  best val {r['best_val_accuracy']:.4f}"
            f"  {json.dumps(r['config'])}")
    best_row, best_ckpt = _best_checkpoint(rows)
    epochs_total = sum(r["epochs"] for r in rows)
    log(f"      best trial {best_row['trial_id']} ({best_ckpt.name}), {epochs_total} epochs in all")

    log(f"[4/5] evaluate: best trial on the test split")
    eval_dir = search_dir / "evaluation"
    metrics = evaluate_checkpoint(best_ckpt, src.splits["test"], eval_dir, f"{name}/{best_row['trial_id']}")
    write_outputs(rows, eval_dir, f"{name}: validation accuracy per trial")  # registered as artifacts
    log(f"      test accuracy {metrics['test_accuracy']:.4f} ({metrics['test_samples']} samples)")

    best_cfg = trial_config(cfg, best_row["config"])
    model_ref, production = "", False
    if register and cfg.registry.enabled:
        run_ref = f"{name}/{best_row['trial_id']}"
        search_meta = {"search": {"name": name, "space": cfg.search.space, "num_samples": cfg.search.num_samples,
                                  "scheduler": cfg.search.scheduler, "max_epochs": epochs_max,
                                  "best_trial": best_row["trial_id"], "best_params": best_row["config"],
                                  "epochs_total": epochs_total},
                       "trials": [{c: r[c] for c in TRIAL_TABLE_COLUMNS} | {"config": r["config"]} for r in rows]}
        mname, version, production = workflow.register_result(best_cfg, run_ref, best_ckpt, eval_dir, metrics,
                                                               extra_meta=search_meta)
        model_ref = f"{mname}@{version}"
        log(f"[5/5] register: {model_ref}" + (" (production)" if production else " (production unchanged: gate)"))
    val_acc = json.loads((best_ckpt / "metrics.json").read_text())["val_accuracy"]
    return SearchResult(name, str(search_dir), [{k: v for k, v in r.items() if k not in ("history", "path")}
                                               for r in rows],
                        best_row["trial_id"], best_row["config"], str(best_ckpt), val_acc,
                        metrics["test_accuracy"], epochs_total, model_ref, production,
                        str(eval_dir / "report.md"), plan.describe(), round(time.time() - t0, 1),
                        run=f"{name}/{best_row['trial_id']}")


def _ray_is_local() -> bool:
    from modelworks.train import ray_is_local

    return ray_is_local()


def run_workflow_search(cfg: WorkflowConfig, *, run_name: str | None = None, data_dir: str | None = None,
                        log: Callable[[str], None] = print):
    """`modelworks run` with search.enabled: the search, returned as the workflow's RunResult."""
    from modelworks.workflow import RunResult

    r = run_search(cfg, name=run_name, data_dir=data_dir, resume=None, log=log)
    return RunResult(r.run, r.search_dir, r.best_checkpoint, r.val_accuracy, r.test_accuracy, r.model, r.report,
                     r.production, r.seconds)


# -------------------------------------------------------------------------------------------------- CLI
def cmd_tune(args: argparse.Namespace) -> int:
    from modelworks.config import apply_overrides, load_workflow

    cfg = apply_overrides(load_workflow(args.workflow), ["search.enabled=true", *(args.set or [])])
    if args.data_dir:
        os.environ["MODELWORKS_DATA_DIR"] = args.data_dir
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    result = run_search(cfg, name=args.name, data_dir=args.data_dir, resume=args.resume, log=log)
    if args.json:
        # Ray prints deduplicated worker log lines ("[repeated Nx across cluster]") with a delay; shut down
        # first so none lands after the summary, which must be the last stdout line.
        import ray

        sys.stdout.flush()
        ray.shutdown()
        print(json.dumps(asdict(result)), flush=True)
    else:
        print(f"best trial: {result.best_trial}  {json.dumps(result.best_params)}")
        print(f"model:  {result.model or '(not registered)'}{'  [production]' if result.production else ''}")
        print(f"test accuracy: {result.test_accuracy:.4f}  (val {result.val_accuracy:.4f}); "
              f"{result.epochs_total} epochs over {len(result.trials)} trials in {result.seconds:.0f} s")
        print(f"trials: {Path(result.search_dir) / 'trials.csv'}")
        print(f"report: {result.report}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("tune", help="hyperparameter search (Ray Tune, ASHA); registers the best trial")
    p.add_argument("workflow", help="workflow file with a search= section, e.g. workflows/mnist.py")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. search.num_samples=4 (repeatable)")
    p.add_argument("--name", help="search name (default: workflow name + config hash)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search; finished trials are kept")
    p.add_argument("--data-dir", help="dataset folder (default: $MODELWORKS_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    p.set_defaults(func=cmd_tune)
