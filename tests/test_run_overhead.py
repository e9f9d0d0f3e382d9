"""What keeps a run's fixed cost down, checked without Ray: the libraries warmed in the background, the Train
controller's poll, and the ingest plan that does not import scikit-learn. bench/overhead.py measures the seconds."""
import os
import sys

import pytest

from modelworks import runtime, warmup
from modelworks.config import load_workflow
from modelworks.pipeline.data_steps import data_files
from tests.fresh_python import run_python


def test_the_ingest_plan_finds_the_digits_file_without_importing_scikit_learn():
    seen = run_python("import json, sys; from modelworks.config import load_workflow; "
                      "from modelworks.pipeline.data_steps import data_files; "
                      "files = data_files(load_workflow('workflows/digits.py'), None); "
                      "print(json.dumps({'files': files, 'sklearn': 'sklearn' in sys.modules}))")
    assert not seen["sklearn"]
    assert [os.path.basename(f) for f in seen["files"]] == ["digits.csv.gz"] and os.path.isfile(seen["files"][0])
    # the file sklearn's loader reads, found the same way here
    assert data_files(load_workflow("workflows/digits.py"), None) == seen["files"]


def test_the_progress_boards_module_imports_ray_but_not_ray_train():
    """The board actor's process imports the module that defines its class: that module must not pull in Ray
    Train (pandas and the rest, ~0.8 s of CPU as Train's own processes start)."""
    from modelworks import progress, progress_board

    assert progress.ProgressBoard is progress_board.ProgressBoard  # the board FollowProgress starts
    alone = run_python("import json, sys; import modelworks.progress_board; "
                       "print(json.dumps({'ray': 'ray' in sys.modules, 'ray.train': 'ray.train' in sys.modules}))")
    assert alone == {"ray": True, "ray.train": False}


def test_warmup_names_what_each_step_will_import():
    digits, lm = load_workflow("workflows/digits.py"), load_workflow("workflows/shakespeare.py")
    assert warmup.ingest_modules(digits) == []  # the digits file is read with numpy
    assert warmup.ingest_modules(digits.model_copy(update={"data": digits.data.model_copy(
        update={"source": "sklearn", "name": "diabetes"})})) == ["sklearn.datasets"]
    assert warmup.ingest_modules(lm) == []
    assert warmup.evaluate_modules(digits) == ["modelworks.evaluate"]
    assert warmup.evaluate_modules(lm) == ["modelworks.evaluate_lm"]


def test_warmup_imports_in_the_background_and_leaves_failures_to_the_step():
    seen = run_python("import json, sys; from modelworks import warmup; "
                      "t = warmup.start(['no_such_module_xyz', 'sklearn.datasets', 'modelworks.evaluate']); "
                      "t.join(120); "
                      "print(json.dumps({'daemon': t.daemon, 'alive': t.is_alive(), "
                      "'loaded': [m in sys.modules for m in ('sklearn.datasets', 'modelworks.evaluate')]}))")
    # a module that fails stops the warm-up there, silently: the step that needs it raises its own error
    assert seen == {"daemon": True, "alive": False, "loaded": [False, False]}
    seen = run_python("import json, sys; from modelworks import warmup; "
                      "t = warmup.start(['sklearn.datasets', 'modelworks.evaluate']); t.join(120); "
                      "print(json.dumps({'loaded': [m in sys.modules for m in "
                      "('sklearn.datasets', 'modelworks.evaluate', 'matplotlib.backends.backend_agg')]}))")
    assert seen == {"loaded": [True, True, True]}


NICE_PROBE = """
import json, os, sys, threading
from pathlib import Path
from modelworks import warmup
from modelworks.pipeline.track import StepTracking

def nice():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

before, seen = nice(), {}
probe = threading.Thread(target=lambda: (warmup.yield_cpu(), seen.update(warmup=nice())))
probe.start()
probe.join()
track = StepTracking(Path(sys.argv[1]), workflow="w", config={}, tags={}, warn=print)
seen["mlflow"] = track._pool.submit(nice).result(60)
track.close("FINISHED")
print(json.dumps({"main": [before, nice()], **seen}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_background_threads_yield_the_cpu_and_the_main_thread_keeps_its_priority(tmp_path):
    """The warm-up thread and the MLflow thread run at nice 19 (Ray's workers run at 15); the driver's main
    thread keeps the process's own. Read from the kernel, per thread."""
    seen = run_python(NICE_PROBE, str(tmp_path / "run"),
                      env={**os.environ, "MODELWORKS_HOME": str(tmp_path), "MODELWORKS_TRACKING": "1"})
    assert seen["main"][0] == seen["main"][1] < 19
    assert seen["warmup"] == 19 and seen["mlflow"] == 19


def test_train_poll_interval_is_set_for_one_fit_and_a_users_choice_wins(monkeypatch):
    monkeypatch.setattr(runtime, "_TRAIN_POLL_FROM_USER", False)
    monkeypatch.delenv(runtime.TRAIN_POLL_ENV, raising=False)
    with runtime.train_poll_interval(0.05):
        assert os.environ[runtime.TRAIN_POLL_ENV] == "0.05"
    assert runtime.TRAIN_POLL_ENV not in os.environ  # put back as it was
    monkeypatch.setenv(runtime.TRAIN_POLL_ENV, "0.2")
    with runtime.train_poll_interval(0.05):
        assert os.environ[runtime.TRAIN_POLL_ENV] == "0.05"
    assert os.environ[runtime.TRAIN_POLL_ENV] == "0.2"
    with runtime.train_poll_interval(None):  # text and language models keep the process default
        assert os.environ[runtime.TRAIN_POLL_ENV] == "0.2"
    monkeypatch.setattr(runtime, "_TRAIN_POLL_FROM_USER", True)  # set before modelworks was imported
    monkeypatch.setenv(runtime.TRAIN_POLL_ENV, "1.5")
    with runtime.train_poll_interval(0.05):
        assert os.environ[runtime.TRAIN_POLL_ENV] == "1.5"


@pytest.mark.parametrize("user_value", [None, "0.7"])
def test_a_poll_interval_set_before_import_counts_as_the_users(user_value):
    env = {k: v for k, v in os.environ.items() if k != runtime.TRAIN_POLL_ENV}
    if user_value:
        env[runtime.TRAIN_POLL_ENV] = user_value
    seen = run_python("import json; from modelworks import runtime; print(json.dumps(runtime._TRAIN_POLL_FROM_USER))",
                      env=env)
    assert seen is bool(user_value)
