"""MLflow tracking for workflow runs, called from the driver process (never from Ray workers).

Store: `MLFLOW_TRACKING_URI` when set (a server, a database, ...); otherwise an embedded SQLite
store at `$MODELWORKS_HOME/mlflow.db`. For any local `sqlite:///` store, artifacts go to
`mlartifacts/` next to the database file (MLflow's own default would be `./mlruns` in whatever
folder the command ran from). Browse it with
`mlflow ui --backend-store-uri sqlite:///$MODELWORKS_HOME/mlflow.db`.

Resume rule: one workflow run is one MLflow run. Its id is kept in `<run_dir>/mlflow.json`, so
rerunning or resuming the same workflow run against the same store continues that MLflow run: metric
steps already logged are skipped, and search trials (child runs) are found again by their key.
A different store (or a run deleted from it) gets a fresh MLflow run.

`MODELWORKS_TRACKING=0` (or off/false/no) turns tracking off: `RunTracker.open` then returns a
tracker whose methods do nothing. mlflow is imported lazily: its import alone takes seconds.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "mlflow.json"
CHILD_KEY_TAG = "modelworks.child_key"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests child runs under the parent
MAX_PARAM_CHARS = 500  # the smallest value limit across MLflow versions/servers; longer values are cut


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded SQLite store under MODELWORKS_HOME."""
    from modelworks import registry  # imported here: registry imports torch, this module stays light

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{registry.home().resolve() / 'mlflow.db'}"


def enabled() -> bool:
    return os.environ.get("MODELWORKS_TRACKING", "1").strip().lower() not in ("0", "off", "false", "no")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        # Creating the tables logs two INFO lines per new database: noise on the run console.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        if not db.exists():
            _create_sqlite_store(db)
    return MlflowClient(tracking_uri=uri)


def _create_sqlite_store(db: Path) -> None:
    """A new SQLite store, placed whole. MLflow creates its tables through a chain of schema migrations (~2 s of
    CPU); a process killed in the middle left a database no later run could open (``table
    _alembic_tmp_experiments already exists``). So the store is built in a file of its own and hard-linked into
    place, which fails if another process placed one first: that one is kept."""
    from mlflow.tracking import MlflowClient

    tmp = db.with_name(f"{db.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # creates the tables
        os.link(tmp, db)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _experiment_id(client, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)
    if exp.lifecycle_stage == "deleted":  # a deleted experiment still owns its name
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            text = str(value)
            flat[f"{prefix}{key}"] = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."
    return flat


def _number(value) -> float | None:
    """A loggable metric value, or None for non-numeric, None, bool, NaN and inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class RunTracker:
    """One MLflow run, written through MlflowClient with an explicit run id (no global active run)."""

    def __init__(self, client, run_id: str):
        self._client = client
        self.run_id = run_id

    @classmethod
    def open(cls, run_dir: Path, *, run_name: str, experiment: str, tags: dict | None = None) -> "RunTracker":
        """Start the MLflow run for this workflow run, or continue it: the MLflow run id is kept in
        run_dir/mlflow.json, so rerunning/resuming the same workflow run reuses the same MLflow run."""
        if not enabled():
            return NullTracker()
        uri = tracking_uri()
        client = _client(uri)
        state_path = Path(run_dir) / STATE_FILE
        run_id = cls._saved_run_id(client, state_path, uri)
        tag_dict = {k: str(v) for k, v in (tags or {}).items()}
        if run_id is None:
            run = client.create_run(_experiment_id(client, uri, experiment), run_name=run_name, tags=tag_dict)
            run_id = run.info.run_id
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}, indent=2) + "\n")
            tmp.replace(state_path)
        else:  # resume: the run is live again; tags are mutable, so this run's values win
            from mlflow.entities import RunTag

            client.update_run(run_id, status="RUNNING")
            tag_dict["modelworks.resumed"] = "true"
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tag_dict.items()])
        return cls(client, run_id)

    @staticmethod
    def _saved_run_id(client, state_path: Path, uri: str) -> str | None:
        """The MLflow run recorded in run_dir, if it lives in this store and has not been deleted."""
        if not state_path.is_file():
            return None
        state = json.loads(state_path.read_text())
        if state.get("tracking_uri") != uri:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(state["run_id"])
        except MlflowException:
            return None
        return run.info.run_id if run.info.lifecycle_stage == "active" else None

    def log_params(self, params: dict) -> None:
        """Nested keys are flattened ("train.lr"). MLflow forbids changing a logged param, so on a
        resume values already logged are skipped, and a changed value (e.g. more epochs) keeps the
        original param and records the new value in a `param_changed.<key>` tag."""
        from mlflow.entities import Param, RunTag

        logged = self._client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in _flatten(params).items():
            if key not in logged:
                new.append(Param(key, value))
            elif logged[key] != value:
                changed.append(RunTag(f"param_changed.{key}", value))
        if changed:
            log.warning("MLflow params are immutable; changed values kept as tags: %s",
                        ", ".join(t.key for t in changed))
        self._batch(params=new, tags=changed)

    def log_history(self, history: list[dict], *, step_key: str = "epoch", prefix: str = "") -> None:
        """Per-epoch (or per-eval-step) metrics: each dict has step_key plus numeric metrics. Steps already
        logged to this run (resume) are not logged twice."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        done: dict[str, set[int]] = {}  # metric key -> steps already in the store
        metrics = []
        for row in history:
            if row.get(step_key) is None:
                continue
            step = int(row[step_key])
            for name, value in row.items():
                key, value = f"{prefix}{name}", _number(value)
                if name == step_key or value is None:
                    continue
                if key not in done:
                    done[key] = {m.step for m in self._client.get_metric_history(self.run_id, key)}
                if step not in done[key]:
                    done[key].add(step)
                    metrics.append(Metric(key, value, now, step))
        self._batch(metrics=metrics)

    def log_metrics(self, metrics: dict) -> None:
        """Final metrics (step 0); non-numeric, None and NaN values are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._batch(metrics=[Metric(k, v, now, 0) for k, v in ((k, _number(v)) for k, v in metrics.items())
                             if v is not None])

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        """Files or folders (a folder's contents go under its own name); missing paths are skipped.
        Logging the same file again on a resume overwrites it."""
        for path in map(Path, paths):
            if path.is_dir():
                sub = f"{artifact_path}/{path.name}" if artifact_path else path.name
                self._client.log_artifacts(self.run_id, str(path), sub)
            elif path.is_file():
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def child(self, name: str, *, key: str) -> "RunTracker":
        """A nested run (search trial), found again by `key` when the same trial is opened again."""
        parent = self._client.get_run(self.run_id)
        found = self._client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}' and tags.`{CHILD_KEY_TAG}` = '{key}'",
            max_results=1,
        )
        if found:
            self._client.update_run(found[0].info.run_id, status="RUNNING")
            return RunTracker(self._client, found[0].info.run_id)
        run = self._client.create_run(parent.info.experiment_id, run_name=name,
                                      tags={PARENT_TAG: self.run_id, CHILD_KEY_TAG: key})
        return RunTracker(self._client, run.info.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: "FINISHED", "FAILED" or "KILLED" (a later resume sets it RUNNING again)."""
        self._client.set_terminated(self.run_id, status=status)

    def _batch(self, **entities: list) -> None:
        """log_batch in chunks: MLflow takes at most 100 params or tags and 1000 metrics per call."""
        for kind, items in entities.items():
            size = 1000 if kind == "metrics" else 100
            for i in range(0, len(items), size):
                self._client.log_batch(self.run_id, **{kind: items[i:i + size]})


class NullTracker(RunTracker):
    """Tracking turned off (MODELWORKS_TRACKING=0): same interface, writes nothing."""

    def __init__(self):
        super().__init__(client=None, run_id="")

    def _nothing(self, *args, **kwargs) -> None:
        return None

    log_params = log_history = log_metrics = log_artifacts = finish = _nothing

    def child(self, name: str, *, key: str) -> "RunTracker":
        return self
