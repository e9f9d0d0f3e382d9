"""The runner's MLflow logging (modelworks/tracking.py), on one background thread: importing MLflow and
opening its store cost seconds, and the run should not wait for them between steps. Calls run in order;
``close`` waits for them. What is logged, once per workflow run, from the driver:

- at the start: the config as params (``train.lr``, ...), tags for the run, config digest and code version;
- per step, also when it came from the cache: the learning curve of ``train``/``search``/``pretrain``
  (``pretrain.*`` metrics), a search's trials as child runs, ``evaluate``'s metrics and report folder,
  ``register``'s model version;
- at the end: manifest.json, and the run's status.

A failure to track never fails the workflow: it prints one line, and the run goes on untracked.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelworks import tracking, warmup


class StepTracking:
    def __init__(self, run_dir: Path, *, workflow: str, config: dict, tags: dict, warn) -> None:
        self.run_dir, self.warn, self.failed = run_dir, warn, False
        self.on = tracking.enabled()
        if not self.on:
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow", initializer=warmup.yield_cpu)
        self._tracker = None
        self._submit(self._open, run_dir.name, workflow, config, tags)

    def _open(self, run_name: str, workflow: str, config: dict, tags: dict) -> None:
        self._tracker = tracking.RunTracker.open(self.run_dir, run_name=run_name, experiment=workflow, tags=tags)
        self._tracker.log_params(config)

    def _submit(self, fn, *args) -> None:
        def guarded():
            if self.failed:
                return
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - tracking is a side channel: report, carry on
                self.failed = True
                self.warn(f"      MLflow tracking stopped ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]});"
                          f" the run goes on untracked")
        self._pool.submit(guarded)

    def step(self, name: str, value, language_model: bool, rows: list[dict] | None = None) -> None:
        if self.on and isinstance(value, dict):
            self._submit(self._log_step, name, value, language_model, rows)

    def _log_step(self, name: str, value: dict, language_model: bool, rows: list[dict] | None) -> None:
        t = self._tracker
        if name in ("train", "search", "pretrain") and value.get("history"):
            t.log_history(value["history"], step_key="step" if language_model and name == "train" else "epoch",
                          prefix="pretrain." if name == "pretrain" else "")
        if name == "search":
            for row in rows or []:
                child = t.child(row["trial_id"], key=row["trial_id"])
                child.log_params(row["config"])
                child.log_history([{"epoch": e, "val_accuracy": a} for e, a in row.get("history", [])])
                child.finish()
        if name == "evaluate":
            t.log_metrics(value.get("metrics", {}))
            t.log_artifacts([Path(value["report"]).parent])
        if name == "register":
            t.log_params({"registered_model": value["model"]})

    def close(self, status: str) -> None:
        if not self.on:
            return
        self._submit(lambda: (self._tracker.log_artifacts([self.run_dir / "manifest.json"]),
                              self._tracker.finish(status)))
        self._pool.shutdown(wait=True)
