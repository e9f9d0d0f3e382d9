"""The language-model workflow (workflows/shakespeare.py, shrunk): the corpus split and its errors, the
config rules, and on a real local Ray a run that is SIGKILLed mid-training, resumes from its last step
checkpoint and ends with exactly the weights of an uninterrupted run (no finished step was repeated or
skipped), then evaluates on the whole validation text, writes samples and registers the model."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelworks import checkpoint
from modelworks.config import DataConfig, apply_overrides, load_workflow
from modelworks.data.corpus import read_corpus
from modelworks.errors import DataError, UserError
from modelworks.registry import Registry
from modelworks.train import list_checkpoints, resume_epoch
from modelworks.workflow import run_workflow
from tests.conftest import require_dataset
from tests.test_console import _worker_pids

REPO = Path(__file__).resolve().parents[1]

# workflows/shakespeare.py shrunk: a smaller model, the first 200,000 characters, 600 steps. Each step costs
# ~10 ms on 2 cores, so there are seconds between two checkpoints in which to kill a worker.
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=128", "model.max_len=32",
        "data.max_rows=200000", "train.max_steps=600", "train.eval_every=100", "train.eval_batches=4",
        "evaluate.sample_tokens=80", "train.max_failures=1"]


def test_corpus_is_split_by_position_and_bad_files_are_one_line(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    (tmp_path / "c.txt").write_text(text)
    corpus = read_corpus(DataConfig(source="corpus", path=str(tmp_path / "c.txt"), val_fraction=0.1), tmp_path, 16)
    assert corpus.train == text[:900] and corpus.val == text[900:]
    with pytest.raises(DataError, match="corpus not found: .*missing.txt; set data.path"):
        read_corpus(DataConfig(source="corpus", path=str(tmp_path / "missing.txt")), tmp_path, 16)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(DataError, match="is not UTF-8 text .*convert it to UTF-8"):
        read_corpus(DataConfig(source="corpus", path=str(tmp_path / "latin1.txt")), tmp_path, 16)
    with pytest.raises(DataError, match="each part needs more than model.max_len"):
        read_corpus(DataConfig(source="corpus", path=str(tmp_path / "c.txt")), tmp_path, 128)


def test_language_model_config_rules():
    cfg = load_workflow(REPO / "workflows/shakespeare.py")
    assert (cfg.evaluate.metric, cfg.registry.gate_metric, cfg.train.optimizer) == ("val_loss", "val_loss", "adamw")
    with pytest.raises(UserError, match="a language model .* reads data.source='corpus'"):
        apply_overrides(cfg, ["model.task=classification"])
    with pytest.raises(UserError, match="a language model trains with adamw"):
        apply_overrides(cfg, ["train.optimizer=sgd"])
    with pytest.raises(UserError, match="gate a language model with registry.gate_threshold"):
        apply_overrides(cfg, ["registry.min_accuracy=0.5"])
    with pytest.raises(UserError, match="'pretrain'"):
        apply_overrides(cfg, ['steps=["pretrain","train","evaluate","register"]'])


@pytest.mark.ray
@pytest.mark.slow
def test_killed_run_resumes_from_its_step_checkpoint_and_matches_an_uninterrupted_run(ray_local, modelworks_home):
    data = require_dataset("tiny-shakespeare").parent
    sets = [a for s in TINY for a in ("--set", s)]
    before = _worker_pids()
    proc = subprocess.Popen([sys.executable, "-m", "modelworks.cli", "run", str(REPO / "workflows/shakespeare.py"),
                             "--json", "--name", "killed", "--data-dir", str(data), *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "MODELWORKS_JOIN_RAY": "0", "MODELWORKS_PROGRESS": "0"})
    run_dir = modelworks_home / "runs" / "killed"
    deadline = time.time() + 400
    while resume_epoch(run_dir) < 200:  # Ray Train has recorded checkpoint_step=200 as its latest
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    workers = _worker_pids(under=proc.pid) - before  # this run's own, not another job's
    assert len(workers) == 1, workers
    os.kill(workers.pop(), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    restarts = [ln for ln in stderr.splitlines() if "worker died" in ln]
    assert len(restarts) == 1 and "resumed from checkpoint_step=" in restarts[0], stderr
    resumed_from = int(restarts[0].split("checkpoint_step=")[1].split()[0])
    assert resumed_from >= 200
    assert sum("step 600/600 " in ln for ln in stderr.splitlines()) == 1, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])

    final = run_dir / "checkpoint_step=600"
    history = json.loads((final / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [100, 200, 300, 400, 500, 600]
    assert history[-1]["val_loss"] < history[0]["val_loss"] < math.log(65)  # it learns; ln(65) is a uniform guess
    # The optimizer counted every step once: a repeated or skipped step would show here.
    adam_steps = {int(s["step"]) for s in checkpoint.load_train_state(final)["optimizer"]["state"].values()}
    assert adam_steps == {600}

    # An uninterrupted run of the same config ends with exactly the same weights: the resumed run drew the
    # same windows from the same step on.
    cfg = apply_overrides(load_workflow(REPO / "workflows/shakespeare.py"), TINY)
    plain = run_workflow(cfg, run_name="uninterrupted", data_dir=str(data), log=lambda line: None)
    assert checkpoint.sha256(Path(plain.checkpoint) / "model.safetensors") == \
        checkpoint.sha256(Path(summary["checkpoint"]) / "model.safetensors")
    assert plain.val_loss == pytest.approx(summary["val_loss"], abs=1e-9)

    # Evaluated on the whole validation text (the last 10 % of the 200,000 characters), sampled, registered.
    assert summary["task"] == "language_model" and summary["test_accuracy"] is None
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))
    metrics = json.loads((run_dir / "evaluation" / "val_metrics.json").read_text())
    assert metrics["val_tokens"] == 20_000 - 1
    report = (run_dir / "evaluation" / "report.md").read_text()
    for sample in metrics["samples"]:
        assert len(sample["text"]) == 80 and sample["prompt"] + sample["text"] in report
    assert [s["prompt"] for s in metrics["samples"]] == ["ROMEO:", "JULIET:\n"]
    assert summary["model"] == "shakespeare@1" and Registry().info("shakespeare", 1)["val_loss"] == summary["val_loss"]
    assert [p.name for _, p in list_checkpoints(run_dir)][-1] == "checkpoint_step=600"


@pytest.mark.ray
def test_two_workers_train_one_model_with_ddp(ray_local, modelworks_home):
    """Each rank draws its own windows (half the global batch) and evaluates its share of the validation
    windows; DDP keeps one model, and the sums across ranks make one validation loss."""
    data = require_dataset("tiny-shakespeare").parent
    cfg = apply_overrides(load_workflow(REPO / "workflows/shakespeare.py"),
                          [*TINY, "train.max_steps=40", "train.eval_every=20", "train.workers=2",
                           "train.max_failures=0", 'steps=["train"]'])
    result = run_workflow(cfg, run_name="ddp", data_dir=str(data), log=lambda line: None)
    history = json.loads((Path(result.checkpoint) / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [20, 40]
    assert history[-1]["val_loss"] < math.log(65)
    # 2 ranks x 6 windows x 32 tokens per step, counted across ranks
    assert history[-1]["tokens_per_s"] > 0 and checkpoint.load(result.checkpoint).spec["head"] == "lm"
