"""Config: every shipped workflow validates; bad keys and types fail with one line naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest

from modelworks.config import WorkflowConfig, apply_overrides, load_workflow
from modelworks.errors import UserError

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.py"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_shipped_workflow_validates(path):
    cfg = load_workflow(path)
    assert isinstance(cfg, WorkflowConfig)
    # A round trip through JSON (what is saved with every run) gives the same config back.
    assert WorkflowConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_mnist_workflow_keeps_the_seed_recipe():
    cfg = load_workflow(REPO / "workflows/mnist.py")
    assert cfg.model.hidden_sizes == [256, 128]
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.optimizer) == (1e-3, 64, 10, "adam")


def test_overrides_set_typed_values():
    cfg = load_workflow(REPO / "workflows/digits.py")
    out = apply_overrides(cfg, ["train.epochs=3", "train.batch_size=128", "model.hidden_sizes=[32,16]",
                                "train.lr_schedule=constant"])
    assert (out.train.epochs, out.train.batch_size, out.model.hidden_sizes) == (3, 128, [32, 16])
    assert out.train.lr_schedule == "constant"
    assert out.digest() != cfg.digest()


@pytest.mark.parametrize("override, needle", [
    ("train.epoch=3", "train.epoch"),
    ("trian.epochs=3", "trian.epochs"),
    ("train.epochs=three", "train.epochs"),
    ("train.lr_schedule=linear", "train.lr_schedule"),
    ("data.val_fraction=0.9", "data.val_fraction"),
    ("noequals", "key=value"),
])
def test_bad_override_names_the_key(override, needle):
    cfg = load_workflow(REPO / "workflows/digits.py")
    with pytest.raises(UserError) as err:
        apply_overrides(cfg, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_bad_key_is_one_line_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "modelworks.cli", "run", str(REPO / "workflows/digits.py"),
                           "--set", "train.epoch=3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown config key 'train.epoch'" in lines[0]


def test_missing_workflow_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_workflow(tmp_path / "nope.py")


def test_workflow_file_with_bad_field_reports_it(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from modelworks.config import *\nCONFIG = WorkflowConfig(name='x', train=TrainConfig(epochs=0))\n")
    with pytest.raises(UserError, match="train.epochs"):
        load_workflow(bad)


def test_regression_metrics_and_gate_follow_the_task():
    reg = load_workflow(REPO / "workflows/diabetes.py")
    assert (reg.evaluate.metric, reg.registry.gate_metric, reg.registry.better()) == ("val_r2", "test_r2", "higher")
    assert reg.registry.threshold() == 0.35
    # Each task's default metric follows a task switched on the command line.
    wine = load_workflow(REPO / "workflows/wine.py")
    switched = apply_overrides(wine, ["model.task=regression", "registry.min_accuracy=0"])
    assert (switched.evaluate.metric, switched.registry.gate_metric) == ("val_r2", "test_r2")
    assert apply_overrides(reg, ["registry.gate_metric=test_mae"]).registry.better() == "lower"


@pytest.mark.parametrize("path, override, needle", [
    ("wine.py", "registry.gate_metric=test_mae", "registry.gate_metric='test_mae' is a regression metric"),
    ("diabetes.py", "train.loss=cross_entropy", "train.loss='cross_entropy' does not fit model.task='regression'"),
    ("digits.py", "model.task=regression", "model.task='regression' needs table data"),
    ("diabetes.py", "registry.min_accuracy=0.9", "registry.gate_threshold"),
    ("wine.py", "data.name=boston", "data.name 'boston' is not a scikit-learn table"),
])
def test_task_mismatches_are_one_line(path, override, needle):
    with pytest.raises(UserError) as err:
        apply_overrides(load_workflow(REPO / "workflows" / path), [override])
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "{" not in str(err.value)  # names the keys, without dumping the whole config


def test_overridden_data_registers_under_the_data_name():
    digits = load_workflow(REPO / "workflows/digits.py")
    as_table = apply_overrides(digits, ["data.source=table", "data.path=/data/wine.csv", "data.label_column=y"])
    assert as_table.registry.model_name == "wine"
    assert apply_overrides(digits, ["data.source=sklearn", "data.name=iris"]).registry.model_name == "iris"
    named = apply_overrides(digits, ["data.source=table", "data.path=s3://b/x.parquet", "registry.model_name=mine"])
    assert named.registry.model_name == "mine"
    assert apply_overrides(digits, ["train.epochs=2", "data.val_fraction=0.2"]).registry.model_name is None
    # Text read from other split files (train.csv, ...) is still the workflow's dataset: its name stays.
    sst2 = load_workflow(REPO / "workflows/sst2.py")
    assert apply_overrides(sst2, ["data.path=/x/train.csv"]).registry.model_name is None
