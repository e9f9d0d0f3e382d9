"""One search trial: ``train.train_loop`` for one sample of the space, one epoch per Tune step.

- 1 training worker: the loop runs in a thread of the trial actor, under Ray Train's local-mode function
  utilities (``ray_private.run_train_fn_here``), whose ``report`` hands each epoch to Tune in lock-step.
  Nothing outlives the trial actor, so a trial stopped by ASHA releases all it held. (The documented Train V2
  pattern - a Tune function that nests a ``TorchTrainer`` - hung on 2 cores: a stopped trial left its Train
  workers behind, ray-project/ray#54305; see docs/ray-notes.md.)
- N > 1 workers: the trial actor runs a real ``TorchTrainer`` (DDP over N workers) and forwards each
  ``checkpoint_epoch=N`` it writes; the controller and workers are owned by the trial actor and die with it
  (``ray_private.abortable_torch_trainer`` lets the trial abort them when ASHA stops it).

A trial keeps its own epoch checkpoints (Tune keeps none) and its own attempts log (``pacing``), so a resumed
search goes on from the newest complete checkpoint of each trial and never reruns a trial that ended.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import threading
import time
from pathlib import Path

from ray import tune  # Ray: a trial is a Tune class trainable

from modelworks import ray_private
from modelworks.config import WorkflowConfig
from modelworks.tune.pacing import PACE_TIMEOUT_S, append_event, asha_rungs, attempts_path, peers_behind, read_attempts
from modelworks.tune.plan import TrialPlan
from modelworks.tune.space import max_epochs, trial_config


class _Stopped(BaseException):
    """Raised inside the training thread when Tune stops the trial (BaseException: train_loop must not catch it)."""


class ModelworksTrial(tune.Trainable):
    """One search trial: `train.train_loop` for one set of sampled hyperparameters, one epoch per step."""

    def setup(self, config, base=None, pre_json=None, datasets=None, plan=None, search_dir=None,
              session=""):
        self.cfg = trial_config(WorkflowConfig.model_validate(base), config)
        self.pre_json, self.datasets, self.plan = pre_json, datasets, TrialPlan(**plan)
        self.search_dir = Path(search_dir)
        # This trial's epoch checkpoints (checkpoint_epoch=N, complete ones carry sha256sums), kept on the
        # storage path by the trial itself, so a resume finds the newest one whatever Tune's saved state
        # says (state.py). Tune keeps no checkpoint of its own.
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
        append_event(self.search_dir, self.trial_id, record)

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
            self._prune_checkpoints()
        self.to_tune.put(("report", dict(metrics)))
        if self.to_train.get() == "stop":
            raise _Stopped()

    def _prune_checkpoints(self) -> None:
        """train.keep_checkpoints, as a Train run keeps them (train.checkpoints_kept): the N best by validation
        accuracy, which the search may pick, and the newest, which ASHA continues from when it promotes the
        trial; the others are deleted."""
        from modelworks.train import list_checkpoints

        keep = self.cfg.train.keep_checkpoints
        found = list_checkpoints(self.run_dir)
        if keep is None or len(found) <= keep + 1:
            return
        score = {p: json.loads((p / "metrics.json").read_text())["val_accuracy"] for _, p in found[:-1]}
        for path in sorted(score, key=score.get, reverse=True)[keep:]:
            shutil.rmtree(path)

    def _run_local(self) -> None:
        from modelworks import train

        try:
            ray_private.run_train_fn_here(self.trial_id, self.datasets, self.resume_dir, self._on_report)
            train.train_loop(self._loop_config())
            self.to_tune.put(("finished", None))
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to Tune as the trial's error
            self.to_tune.put(("error", exc))

    # -- N workers: a real TorchTrainer; forward each checkpoint_epoch=N it writes
    def _run_distributed(self) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig

        from modelworks import train

        try:
            ray_private.abortable_torch_trainer(self)(
                train.train_loop, train_loop_config=self._loop_config(),
                datasets={"train": self.datasets["train"], "val": self.datasets["val"]},
                scaling_config=ScalingConfig(num_workers=self.cfg.train.workers, use_gpu=self.cfg.train.use_gpu,
                                             resources_per_worker={"CPU": self.plan.cpus_per_worker}),
                run_config=RunConfig(name=self.trial_id, storage_path=str(self.search_dir / "train"),
                                     failure_config=FailureConfig(max_failures=self.cfg.train.max_failures),
                                     checkpoint_config=train.checkpoints_kept(self.cfg)),
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
