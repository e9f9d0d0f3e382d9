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
