"""What keeps a run's fixed cost down, checked without Ray: the libraries warmed in the background, the Train
controller's poll, and the ingest plan that does not import scikit-learn. bench/overhead.py measures the seconds."""
import json
import os
import subprocess
import sys

import pytest

from modelworks import runtime, warmup
from modelworks.config import load_workflow
from modelworks.pipeline.data_steps import data_files


def run_python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_ingest_plan_finds_the_digits_file_without_importing_scikit_learn():
    seen = run_python("import json, sys; from modelworks.config import load_workflow; "
                      "from modelworks.pipeline.data_steps import data_files; "
                      "files = data_files(load_workflow('workflows/digits.py'), None); "
                      "print(json.dumps({'files': files, 'sklearn': 'sklearn' in sys.modules}))")
    assert not seen["sklearn"]
    assert [os.path.basename(f) for f in seen["files"]] == ["digits.csv.gz"] and os.path.isfile(seen["files"][0])
    # the file sklearn's loader reads, found the same way here
    assert data_files(load_workflow("workflows/digits.py"), None) == seen["files"]


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
    out = subprocess.run([sys.executable, "-c", "from modelworks import runtime; print(runtime._TRAIN_POLL_FROM_USER)"],
                         capture_output=True, text=True, check=True, env=env, timeout=120)
    assert out.stdout.strip() == str(bool(user_value))
