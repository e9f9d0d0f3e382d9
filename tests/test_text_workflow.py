"""The Transformer workflow on a real local Ray: pre-train -> fine-tune chained in one run, lineage by
weight hash, the from-scratch baseline (2-worker DDP), fine-tuning from a registered encoder, resume
after SIGKILL without redoing pre-training, and SST-2 read as it ships."""
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelworks import checkpoint
from modelworks.config import apply_overrides, load_workflow
from modelworks.registry import Registry
from modelworks.train import list_checkpoints
from modelworks.workflow import run_workflow
from tests.conftest import assert_two_ranks, require_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

POSITIVE = ["good", "great", "wonderful", "moving", "funny", "charming", "brilliant", "gorgeous"]
NEGATIVE = ["bad", "dull", "awful", "boring", "tedious", "clumsy", "lifeless", "dreadful"]
FILLER = ["the", "film", "is", "a", "story", "with", "acting", "that", "feels", "quite", "movie", "plot", "very"]


def write_sentiment_csvs(folder: Path, rows: int = 600, random_seed: int = 0) -> dict[str, Path]:
    """A small learnable sentiment dataset: the label is the polarity of the one sentiment word."""
    rng = random.Random(random_seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", rows), ("validation", rows // 5), ("test", rows // 5)):
        path = folder / f"{split}.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                label = rng.randrange(2)
                words = rng.choices(FILLER, k=rng.randint(3, 12))
                words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
                w.writerow([" ".join(words), label])
        paths[split] = path
    return paths


def tiny_text(path: Path, *overrides: str):
    """workflows/sst2.py shrunk (sizes, epochs), reading the small CSVs: the same steps and mechanism."""
    cfg = load_workflow(REPO / "workflows/sst2.py")
    return apply_overrides(cfg, [
        f"data.path={path / 'train.csv'}", f"data.val_path={path / 'validation.csv'}",
        f"data.test_path={path / 'test.csv'}", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "model.d_ff=64", "model.max_len=24", "model.vocab_size=200", "pretrain.epochs=2",
        "pretrain.batch_size=32", "train.epochs=3", "train.batch_size=16", "train.lr=2e-3",
        "registry.min_accuracy=0.0", *overrides])


def encoder_digest(ckpt: Path) -> str:
    return checkpoint.state_digest(checkpoint.load(ckpt).model.encoder)


ROWS = 400  # training rows of the chained run's CSVs (validation and test: 80 each)


def cli(*args, env: dict, merge=True):
    return subprocess.Popen([sys.executable, "-m", "modelworks.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


@pytest.fixture(scope="module")
def killed_chain(tmp_path_factory):
    """One pre-train -> fine-tune run through `modelworks run`, SIGKILLed (driver and the private Ray it
    started) after fine-tune epoch 1, then rerun to the end: what the SIGKILL test checks, and the finished
    chained run whose lineage the chain test checks. A whole chained run costs minutes of Ray Train start-up
    on 2 CPUs; both tests read this one. Returns what was on disk before the rerun and what the rerun printed."""
    home = tmp_path_factory.mktemp("text_chain")
    data = write_sentiment_csvs(home / "data", rows=ROWS)["train"].parent
    args = ["run", str(REPO / "workflows/sst2.py"), "--json", "--name", "killed",
            "--set", f"data.path={data / 'train.csv'}", "--set", f"data.val_path={data / 'validation.csv'}",
            "--set", f"data.test_path={data / 'test.csv'}", "--set", "model.d_model=32", "--set", "model.n_layers=1",
            "--set", "model.n_heads=2", "--set", "model.d_ff=64", "--set", "model.max_len=24",
            "--set", "model.vocab_size=200", "--set", "pretrain.epochs=2", "--set", "train.epochs=6",
            # batch 2, 6 epochs: the kill, sent once epoch 1's checkpoint is seen, lands before the last epoch's
            # even when the test process waits for a core (an epoch here is ~0.5 s)
            "--set", "train.batch_size=2", "--set", "registry.min_accuracy=0"]
    # MODELWORKS_JOIN_RAY=0: the CLI starts a private Ray that goes down with it, never joining a `ray start`
    # cluster someone left running on this (shared) machine.
    env = {**os.environ, "MODELWORKS_HOME": str(home / "mwhome"), "MODELWORKS_TRACKING": "0",
           "MODELWORKS_PROGRESS": "0", "MODELWORKS_JOIN_RAY": "0"}
    for name in ("RAY_ADDRESS", "MODELWORKS_REGISTRY"):  # as the per-test modelworks_home fixture does
        env.pop(name, None)
    proc = cli(*args, env=env)
    run_dir = home / "mwhome" / "runs" / "killed"
    deadline = time.time() + 400
    while not (run_dir / "checkpoint_epoch=1" / "sha256sums").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended or stalled before fine-tune epoch 1"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, as when the machine dies
    proc.wait()
    pretrained = {p.name: checkpoint.sha256(p / "model.safetensors") for _, p in list_checkpoints(run_dir / "pretrain")}
    finished_before_rerun = sorted(p.name for p in run_dir.glob("checkpoint_epoch=*"))

    rerun = cli(*args, env=env, merge=False)
    stdout, stderr = rerun.communicate(timeout=600)
    return {"home": home / "mwhome", "data": data, "run_dir": run_dir, "pretrained": pretrained,
            "finished_before_rerun": finished_before_rerun, "returncode": rerun.returncode,
            "stdout": stdout, "out": stderr + stdout}


@pytest.mark.slow
def test_sigkill_during_finetune_then_rerun_does_not_redo_pretraining(killed_chain):
    run_dir, pretrained, out = killed_chain["run_dir"], killed_chain["pretrained"], killed_chain["out"]
    assert list(pretrained) == ["checkpoint_epoch=1", "checkpoint_epoch=2"]
    assert "checkpoint_epoch=6" not in killed_chain["finished_before_rerun"]
    assert killed_chain["returncode"] == 0, out[-3000:]
    assert "mlm epoch" not in out, "pre-training ran again"
    assert re.search(r"pretrain +0\.0 s  cached \(this run\): encoder checkpoint_epoch=2", out), out[-3000:]
    assert "resuming train from checkpoint_epoch=" in out and "classify epoch 1/6" not in out
    for name, digest in pretrained.items():  # the finished step's checkpoints are untouched
        assert checkpoint.sha256(run_dir / "pretrain" / name / "model.safetensors") == digest
    history = json.loads((run_dir / "checkpoint_epoch=6" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    summary = json.loads(killed_chain["stdout"].strip().splitlines()[-1])
    assert summary["run"] == "killed" and summary["model"] == "sst2@1"


@pytest.mark.slow
def test_pretrain_then_finetune_chain_lineage_baseline_and_reuse_by_reference(ray_local, killed_chain, monkeypatch):
    """The chained run (killed_chain's, finished by its rerun), then two more in its MODELWORKS_HOME: the
    from-scratch baseline and a fine-tune from the registered encoder."""
    assert killed_chain["returncode"] == 0, killed_chain["out"][-3000:]
    monkeypatch.setenv("MODELWORKS_HOME", str(killed_chain["home"]))  # its registry holds sst2-encoder@1
    data = killed_chain["data"]
    result = json.loads(killed_chain["stdout"].strip().splitlines()[-1])  # --json: the run's summary
    run_dir = Path(result["run_dir"])
    pretrained = list_checkpoints(run_dir / "pretrain")
    assert [e for e, _ in pretrained] == [1, 2]
    assert checkpoint.load(pretrained[-1][1]).spec["head"] == "mlm"
    # The fine-tune step started from exactly the pre-trained encoder (compared by weight hash) ...
    first = json.loads((list_checkpoints(run_dir)[0][1] / "metrics.json").read_text())  # every epoch records it
    assert first["init_from"] == str(pretrained[-1][1])
    assert first["init_encoder_sha256"] == encoder_digest(pretrained[-1][1])
    # ... and the tokenizer it reads text with is the pre-trained encoder's.
    assert (Path(result["checkpoint"]) / "tokenizer.json").read_text() == \
        (pretrained[-1][1] / "tokenizer.json").read_text()
    assert result["model"] == "sst2@1" and result["val_accuracy"] > 0.8 and result["test_accuracy"] > 0.8
    reg = Registry()
    assert reg.versions("sst2-encoder") == [1] and reg.info("sst2-encoder", 1)["task"] == "mlm"
    report = (run_dir / "evaluation" / "report.md").read_text()
    assert "Most confidently wrong" in report and "tokens/s" in report

    # The baseline: one setting skips pre-training; the classifier's encoder starts from fresh weights.
    # It trains with 2 DDP workers: the text loop's distributed path, on the same data.
    baseline = run_workflow(tiny_text(data, "pretrain.enabled=false", "train.workers=2"), log=lambda m: None)
    base_checkpoints = list_checkpoints(Path(baseline.run_dir))
    base_first = json.loads((base_checkpoints[0][1] / "metrics.json").read_text())
    assert not (Path(baseline.run_dir) / "pretrain").exists()
    assert base_first["init_from"] is None
    assert base_first["init_encoder_sha256"] != first["init_encoder_sha256"]
    assert reg.versions("sst2-encoder") == [1]  # no encoder minted without pre-training
    base_last = json.loads((base_checkpoints[-1][1] / "metrics.json").read_text())
    # Both ranks' rows are counted: about the whole training split, not half of it.
    assert ROWS - 2 * 16 <= base_last["train_samples"] <= ROWS
    assert base_last["tokens_per_s"] > 0 and baseline.test_accuracy > 0.7
    assert_two_ranks(base_last["workers"])

    # Another workflow (other name, other architecture in its config) fine-tunes from the registry entry.
    other = tiny_text(data, "name=sentiment-from-encoder", "steps=[\"train\",\"evaluate\",\"register\"]",
                      "train.init_from=sst2-encoder@production", "model.d_model=64", "train.epochs=2")
    reused = run_workflow(other, log=lambda m: None)
    reused_first = json.loads((list_checkpoints(Path(reused.run_dir))[0][1] / "metrics.json").read_text())
    assert reused_first["init_encoder_sha256"] == encoder_digest(reg.checkpoint_dir("sst2-encoder", 1))
    assert checkpoint.load(reused.checkpoint).spec["d_model"] == 32  # the encoder's width, not the config's
    assert reused.model == "sentiment-from-encoder@1" and reused.test_accuracy > 0.7


def test_sst2_read_as_it_ships(ray_local, modelworks_home):
    """The real SST-2 files: its own validation (872) and test (1,821) splits, class names from labels.txt."""
    require_dataset("sst2")
    cfg = apply_overrides(load_workflow(REPO / "workflows/sst2.py"), [
        "data.max_rows=3000", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
        "model.vocab_size=1000", "pretrain.enabled=false", "train.epochs=1", "registry.min_accuracy=0"])
    result = run_workflow(cfg, log=lambda m: None)
    metrics = json.loads((Path(result.run_dir) / "evaluation" / "test_metrics.json").read_text())
    assert metrics["test_samples"] == 1821
    assert set(metrics["per_class"]) == {"negative", "positive"}
    assert sum(metrics["confusion_matrix"][0]) == 912  # negatives in the labelled SST-2 test split
    assert len(metrics["confidently_wrong"]["validation"]) == 10
    # With validation and test shipped, training reads all of its rows (none carved away): 3000 // 32 batches.
    trained = json.loads((Path(result.checkpoint) / "metrics.json").read_text())
    assert trained["train_samples"] == 3000 // 32 * 32
