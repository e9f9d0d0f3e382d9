"""MLflow tracking: a real SQLite store under the test's MODELWORKS_HOME, read back with the MLflow client."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from modelworks import tracking
from modelworks.tracking import RunTracker

EXPERIMENT = "mnist-mlp"


@pytest.fixture(autouse=True)
def tracking_on(monkeypatch):
    """Tracking is on by default for users; conftest turns it off for the rest of the suite."""
    monkeypatch.setenv("MODELWORKS_TRACKING", "1")


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A store with MLflow's tables already created: a new database runs all migrations (~4 s), once."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(modelworks_home, empty_store) -> Path:
    modelworks_home.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(empty_store, modelworks_home / "mlflow.db"))


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri())


def only_run(experiment: str = EXPERIMENT):
    c = client()
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def history(epochs) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / e, "val_accuracy": 0.5 + e / 100, "note": "x", "lr": None}
            for e in epochs]


def steps(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


def test_one_run_with_params_epoch_metrics_and_artifacts(store, tmp_path, modelworks_home):
    run_dir = modelworks_home / "runs" / "r1"
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.png").write_bytes(b"png")
    (tmp_path / "report.md").write_text("# report\n")
    tracker = RunTracker.open(run_dir, run_name="r1", experiment=EXPERIMENT, tags={"workflow": "mnist"})
    tracker.log_params({"train": {"lr": 0.01, "epochs": 3}, "model": "mlp", "long": "v" * 900})
    tracker.log_history(history([1, 2, 3]))
    tracker.log_history([{"step": 10, "loss": 0.3}], step_key="step", prefix="eval/")
    tracker.log_metrics({"test_accuracy": 0.97, "name": "mlp", "nan": float("nan"), "none": None})
    tracker.log_artifacts([tmp_path / "report.md", tmp_path / "plots", tmp_path / "missing.json"])
    tracker.finish()

    run = only_run()
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run.info.run_id
    assert steps(run.info.run_id, "train_loss") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert steps(run.info.run_id, "val_accuracy") == [(1, 0.51), (2, 0.52), (3, 0.53)]
    assert steps(run.info.run_id, "eval/loss") == [(10, 0.3)]
    assert run.data.metrics["test_accuracy"] == 0.97
    assert not {"note", "lr", "name", "nan", "none"} & set(run.data.metrics)
    params = run.data.params
    assert params["train.lr"] == "0.01" and params["train.epochs"] == "3" and params["model"] == "mlp"
    assert len(params["long"]) == tracking.MAX_PARAM_CHARS
    assert run.data.tags["workflow"] == "mnist"
    listed = {a.path for a in client().list_artifacts(run.info.run_id)}
    assert listed == {"report.md", "plots"}
    assert [a.path for a in client().list_artifacts(run.info.run_id, "plots")] == ["plots/loss.png"]
    # Embedded store: database and artifacts both live under MODELWORKS_HOME, not in the working directory.
    assert run.info.artifact_uri.startswith((modelworks_home / "mlartifacts").resolve().as_uri())


def test_resume_continues_the_same_run(store, modelworks_home, caplog):
    run_dir = modelworks_home / "runs" / "r2"
    first = RunTracker.open(run_dir, run_name="r2", experiment=EXPERIMENT)
    first.log_params({"train": {"epochs": 3, "lr": 0.01}})
    first.log_history(history([1, 2, 3]))
    first.finish("KILLED")

    resumed = RunTracker.open(run_dir, run_name="r2", experiment=EXPERIMENT)
    assert resumed.run_id == first.run_id
    assert client().get_run(first.run_id).info.status == "RUNNING"
    resumed.log_params({"train": {"epochs": 5, "lr": 0.01}})  # same lr is fine, changed epochs must not raise
    resumed.log_history(history([1, 2, 3, 4, 5]))
    resumed.log_history(history([1, 2, 3, 4, 5]))  # a repeated call adds nothing either
    resumed.finish()

    run = only_run()
    assert run.info.status == "FINISHED"
    assert [s for s, _ in steps(run.info.run_id, "train_loss")] == [1, 2, 3, 4, 5]
    assert [s for s, _ in steps(run.info.run_id, "val_accuracy")] == [1, 2, 3, 4, 5]
    assert run.data.params["train.epochs"] == "3"  # MLflow params are immutable ...
    assert run.data.tags["param_changed.train.epochs"] == "5"  # ... the new value is kept as a tag
    assert "param_changed.train.lr" not in run.data.tags
    assert "immutable" in caplog.text


def test_search_trials_are_child_runs_reused_by_key(store, modelworks_home):
    run_dir = modelworks_home / "runs" / "tune1"
    parent = RunTracker.open(run_dir, run_name="tune1", experiment=EXPERIMENT)
    trials = {key: parent.child(f"trial {key}", key=key) for key in ("t0", "t1")}
    for i, trial in enumerate(trials.values()):
        trial.log_params({"lr": 10.0 ** -(i + 2)})
        trial.log_history(history([1, 2]))
        trial.finish()
    parent.finish()

    again = RunTracker.open(run_dir, run_name="tune1", experiment=EXPERIMENT)  # a resumed search
    t0 = again.child("trial t0", key="t0")
    assert again.run_id == parent.run_id and t0.run_id == trials["t0"].run_id
    t0.log_history(history([1, 2, 3]))
    t0.finish()
    again.finish()

    c = client()
    runs = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 3
    children = {r.data.tags[tracking.CHILD_KEY_TAG]: r for r in runs if r.info.run_id != parent.run_id}
    assert set(children) == {"t0", "t1"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.run_id for r in children.values())
    assert [s for s, _ in steps(children["t0"].info.run_id, "train_loss")] == [1, 2, 3]
    assert children["t1"].data.params["lr"] == "0.001"


def test_mlflow_tracking_uri_is_honoured(empty_store, tmp_path, modelworks_home, monkeypatch):
    other = Path(shutil.copy(empty_store, tmp_path / "other.db"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert tracking.tracking_uri() == f"sqlite:///{other}"
    tracker = RunTracker.open(modelworks_home / "runs" / "r3", run_name="r3", experiment=EXPERIMENT)
    tracker.log_history(history([1]))
    tracker.finish()
    assert only_run().info.run_id == tracker.run_id
    assert not (modelworks_home / "mlflow.db").exists()


def test_default_uri_is_under_modelworks_home(modelworks_home, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{modelworks_home.resolve() / 'mlflow.db'}"


@pytest.mark.parametrize("value", ["0", "off"])
def test_disabled_writes_nothing(modelworks_home, monkeypatch, tmp_path, value):
    monkeypatch.setenv("MODELWORKS_TRACKING", value)
    (tmp_path / "report.md").write_text("r")
    run_dir = modelworks_home / "runs" / "r4"
    tracker = RunTracker.open(run_dir, run_name="r4", experiment=EXPERIMENT)
    tracker.log_params({"a": 1})
    tracker.log_history(history([1]))
    tracker.log_metrics({"acc": 1.0})
    tracker.log_artifacts([tmp_path / "report.md"])
    tracker.child("t", key="t").finish()
    tracker.finish()
    assert tracker.run_id == ""
    assert not modelworks_home.exists()


def test_importing_the_module_does_not_import_mlflow():
    code = "import sys, modelworks.tracking; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def mlflow_server_bin() -> str | None:
    """An `mlflow` that can serve the UI: MODELWORKS_TEST_MLFLOW_BIN (e.g. a user's full mlflow install),
    else this venv's own when its server dependencies are installed (mlflow-skinny alone has none)."""
    explicit = os.environ.get("MODELWORKS_TEST_MLFLOW_BIN")
    if explicit:
        return explicit
    if importlib.util.find_spec("flask") is None:
        return None
    return str(Path(sys.executable).with_name("mlflow"))


def test_mlflow_server_lists_the_run(store, modelworks_home, tmp_path):
    binary = mlflow_server_bin()
    if binary is None:
        pytest.skip("no mlflow server here: set MODELWORKS_TEST_MLFLOW_BIN to a full mlflow's `mlflow`")
    tracker = RunTracker.open(modelworks_home / "runs" / "r5", run_name="r5", experiment=EXPERIMENT)
    tracker.log_history(history([1, 2]))
    tracker.finish()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([binary, "server", "--backend-store-uri", tracking.tracking_uri(),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                              start_new_session=True)  # its own process group: it spawns uvicorn and job workers
    try:
        body = json.dumps({"experiment_ids": [only_run().info.experiment_id]}).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    runs = json.load(response)["runs"]
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not answer within 60 s"
                time.sleep(0.5)
        assert [r["info"]["run_id"] for r in runs] == [tracker.run_id]
        assert {m["key"] for m in runs[0]["data"]["metrics"]} == {"train_loss", "val_accuracy"}
    finally:
        stop_group(server)
        log.close()


def stop_group(process: subprocess.Popen) -> None:
    """Stop the server and everything it started: its job workers outlive a plain terminate()."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(1)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever in the group did not exit on SIGTERM
    except ProcessLookupError:
        pass


def test_a_process_killed_while_creating_the_store_leaves_none_and_the_next_run_creates_it(modelworks_home):
    """The store is placed whole: a process killed after MLflow built its tables but before the store was in
    place leaves no mlflow.db (MLflow's migrations killed half-way left one no run could open), and the next
    run creates a good one."""
    db = modelworks_home / "mlflow.db"
    code = ("import os, signal; from modelworks import tracking; "
            "os.link = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "  # dies between building and placing
            f"tracking._client('sqlite:///{db}')")
    died = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr.decode()[-2000:]
    assert not db.exists()

    RunTracker.open(modelworks_home / "runs" / "r", run_name="r", experiment=EXPERIMENT).finish()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert len(client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])) == 1
    assert not (modelworks_home / f"mlflow.db.{os.getpid()}.tmp").exists()  # this process's building file is gone


def test_a_store_another_process_placed_first_is_kept(empty_store, modelworks_home):
    from mlflow.tracking import MlflowClient

    db = modelworks_home / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, db)
    MlflowClient(tracking_uri=f"sqlite:///{db}").create_experiment("placed-first")
    tracking._create_sqlite_store(db)  # lost the race: keeps the store that is there
    assert MlflowClient(tracking_uri=f"sqlite:///{db}").get_experiment_by_name("placed-first") is not None
    assert not list(modelworks_home.glob("mlflow.db.*.tmp"))
