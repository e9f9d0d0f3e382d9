"""Checkpoint round trip and checksum refusal; registry versions, aliases and the CLI over them."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from modelworks import checkpoint
from modelworks.data.preprocess import Preprocessor
from modelworks.errors import CheckpointError, UserError
from modelworks.models import build_model
from modelworks.registry import Registry


def make_checkpoint(path, seed=0, val_accuracy=0.9):
    torch.manual_seed(seed)
    spec = {"name": "mlp", "input_dim": 64, "num_classes": 10, "hidden_sizes": [16], "dropout": 0.0}
    model = build_model(spec)
    pre = Preprocessor([8, 8], 4.8, 6.0, list(range(10)), [str(i) for i in range(10)])
    return checkpoint.save(path, model=model, spec=spec, preprocessor=pre,
                           metrics={"epoch": 1, "val_accuracy": val_accuracy, "val_loss": 0.5, "history": []},
                           config={"name": "t"}, train_state={"optimizer": {}, "epoch": 1}), model


def test_round_trip_gives_identical_predictions(tmp_path):
    path, model = make_checkpoint(tmp_path / "ck")
    loaded = checkpoint.load(path)
    x = np.random.default_rng(0).uniform(0, 16, size=(5, 8, 8)).astype(np.float32)
    expected = torch.softmax(model(torch.from_numpy((x.reshape(5, 64) - 4.8) / 6.0)), 1)
    torch.testing.assert_close(loaded.predict_proba(x), expected)
    assert loaded.class_names == [str(i) for i in range(10)]
    assert checkpoint.load_train_state(path)["epoch"] == 1


@pytest.mark.parametrize("victim", ["model.safetensors", "preprocessor.json", "model.json"])
def test_tampered_file_is_refused(tmp_path, victim):
    path, _ = make_checkpoint(tmp_path / "ck")
    with open(path / victim, "ab") as f:
        f.write(b" ")
    with pytest.raises(CheckpointError, match=f"{victim} does not match its sha256"):
        checkpoint.load(path)


def test_missing_sums_or_file_is_refused(tmp_path):
    path, _ = make_checkpoint(tmp_path / "ck")
    (path / "labels.json").unlink()
    with pytest.raises(CheckpointError, match="labels.json is missing"):
        checkpoint.load(path)
    (path / checkpoint.SUMS).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.load(path)


def test_registry_versions_are_immutable_and_aliases_move(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    a, _ = make_checkpoint(tmp_path / "a", seed=0)
    b, _ = make_checkpoint(tmp_path / "b", seed=1)
    assert reg.register("digits", a, meta={"test_accuracy": 0.9}) == 1
    assert reg.register("digits", b, meta={"test_accuracy": 0.95}) == 2
    assert reg.versions("digits") == [1, 2]
    assert reg.resolve("digits") == ("digits", 2)  # bare name = latest
    reg.set_alias("digits", "production", 1)
    assert reg.resolve("digits@production") == ("digits", 1)
    assert reg.info("digits", 1)["aliases"] == ["production"]
    loaded, version = reg.load("digits@1")
    assert version == 1 and loaded.metrics["epoch"] == 1
    stored = reg.checkpoint_dir("digits", 1) / "model.safetensors"
    assert stored.stat().st_mode & 0o222 == 0  # stored read-only (root could still write: sums catch that)


def test_registry_refuses_unknown_refs_and_corrupt_versions(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    a, _ = make_checkpoint(tmp_path / "a")
    reg.register("m", a)
    with pytest.raises(UserError, match="no version 7"):
        reg.resolve("m@7")
    with pytest.raises(UserError, match="no alias 'staging'"):
        reg.resolve("m@staging")
    with pytest.raises(UserError, match="not in the registry"):
        reg.resolve("other")
    stored = reg.checkpoint_dir("m", 1) / "model.safetensors"
    stored.chmod(0o644)
    stored.write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="sha256"):
        reg.load("m@1")


def test_register_refuses_a_checkpoint_failing_its_sums(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    a, _ = make_checkpoint(tmp_path / "a")
    (a / "metrics.json").write_text("{}")
    with pytest.raises(CheckpointError):
        reg.register("m", a)
    assert reg.versions("m") == []


def test_models_cli_list_show_promote(tmp_path, modelworks_home):
    reg = Registry()
    for seed in (0, 1):
        reg.register("digits", make_checkpoint(tmp_path / f"c{seed}", seed=seed)[0], meta={"test_accuracy": 0.9})

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "modelworks.cli", "models", *args],
                              capture_output=True, text=True, timeout=60)

    rows = json.loads(cli("list", "--json").stdout)
    assert [r["model"] for r in rows] == ["digits@1", "digits@2"]
    assert cli("promote", "digits", "1").returncode == 0
    shown = json.loads(cli("show", "digits@production").stdout)
    assert shown["version"] == 1 and "production" in shown["aliases"]
    bad = cli("promote", "digits", "9")
    assert bad.returncode == 2 and "no version 9" in bad.stderr and "Traceback" not in bad.stderr


def test_object_storage_checkpoints_are_pulled_into_the_run_folder(tmp_path, monkeypatch):
    """storage.pull, against a file:// URI standing in for a bucket (the real S3 path: test_multinode.py):
    the complete checkpoints the run folder lacks come over, one cut off mid-upload (no sums) does not, one
    Ray Train deleted there goes here too, and the snapshot is refreshed."""
    from modelworks import storage

    home, bucket = tmp_path / "home", tmp_path / "bucket"
    monkeypatch.setenv("MODELWORKS_HOME", str(home))
    monkeypatch.setenv(storage.ENV, f"file://{bucket}/")
    remote_run = bucket / "runs" / "r1"
    for epoch in (2, 3):
        make_checkpoint(remote_run / f"checkpoint_epoch={epoch}", val_accuracy=epoch / 10)
    (remote_run / "checkpoint_epoch=4").mkdir()
    (remote_run / "checkpoint_epoch=4" / "model.safetensors").write_bytes(b"half")
    (remote_run / storage.SNAPSHOT).write_text('{"latest": 3}')
    run_dir = home / "runs" / "r1"
    make_checkpoint(run_dir / "checkpoint_epoch=1")  # deleted on the bucket by keep_checkpoints since

    assert storage.train_storage(home / "runs") == f"file://{bucket}/runs"
    assert storage.pull(run_dir) == 2
    assert sorted(p.name for p in run_dir.iterdir()) == \
        ["checkpoint_epoch=2", "checkpoint_epoch=3", storage.SNAPSHOT]
    assert checkpoint.load(run_dir / "checkpoint_epoch=3").metrics["val_accuracy"] == 0.3  # checksums verified
    assert storage.pull(run_dir) == 0  # level already: nothing copied again
    monkeypatch.delenv(storage.ENV)
    assert storage.train_storage(home / "runs") == str(home / "runs") and storage.pull(run_dir) == 0
