"""bench/gpu_check.py, tiny, on the CPU: it trains both heads (loss falls, tokens/s measured, JSON written)
and never imports Ray, so that it runs on a GPU machine where only torch, numpy and tokenizers exist.
bench/text_throughput.py runs tiny too (plain loop and a real 1-worker Ray Train run).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_dataset

REPO = Path(__file__).resolve().parents[1]

# A model and run small enough for ~10 s of CPU (one thread: a CPU shared with other jobs runs a single
# thread far faster than two that spin-wait on each other); synthetic data, whatever MODELWORKS_DATA_DIR says.
TINY = ["--device", "cpu", "--data", "synthetic", "--rows", "1000", "--d-model", "32", "--layers", "1",
        "--heads", "2", "--batch-size", "16", "--max-len", "32", "--steps", "40", "--log-every", "10",
        "--window", "10", "--lr", "3e-3", "--threads", "1"]


def imported_modules(importtime_log: str) -> set[str]:
    """Module names from `python -X importtime` (stderr lines `import time: self | cumulative | name`)."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_gpu_check_trains_tiny_on_cpu_without_ray(tmp_path):
    out = tmp_path / "gpu_check.json"
    # Run from a foreign working directory: the script must find src/ by itself (no pip install there).
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "bench/gpu_check.py"), *TINY,
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads(out.read_text())
    assert result["env"]["device"] == "cpu" and result["env"]["dtype"] == "fp32"
    assert result["data"]["source"] == "synthetic"
    assert set(result["tasks"]) == {"mlm", "classify"}
    for task, r in result["tasks"].items():
        assert r["tokens_per_s"] > 0, task
        assert len(r["losses"]) == 40, task
        assert r["last_window_loss"] < r["first_window_loss"], (task, r["first_window_loss"], r["last_window_loss"])
        assert r["loss_fell"], task
    assert "== summary" in proc.stdout and "tokens/s" in proc.stdout

    modules = imported_modules(proc.stderr)
    # The log is parsed right (else the Ray check below would pass vacuously) ...
    assert {"torch", "tokenizers", "modelworks.text_steps", "modelworks.models.transformer"} <= modules
    # ... and no module of Ray (nor of anything that pulls Ray in) was loaded.
    assert not {m for m in modules if m == "ray" or m.startswith("ray.")}


@pytest.mark.ray
def test_text_throughput_bench_runs_tiny(tmp_path):
    """bench/text_throughput.py end to end, tiny: the plain loop and a real 1-worker Ray Train run on the
    same SST-2 sentences, a ratio printed and written to JSON."""
    data = require_dataset("sst2").parent
    out = tmp_path / "text_throughput.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/text_throughput.py"), "--data-dir", str(data),
                           "--rows", "400", "--epochs", "2", "--workers", "1", "--plain-threads", "1",
                           "--repeat", "1", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rows"] == 400
    assert result["order"] == ["mw1", "plain"]  # the thread probe's run comes first and is not counted
    for variant in ("plain", "mw1"):
        assert len(result[variant]["rates"]) == 2 and result[variant]["tokens_per_s"] > 0, variant
        assert len(result[variant]["runs"]) == 1, variant
    assert result["ratios"]["mw1_vs_plain"] > 0
    assert "mw1_vs_plain:" in proc.stdout
    # Ray's output (Ray Data's banners, the worker's echoed lines) is in the log file, not on the console.
    ray_log = out.with_suffix(".ray.log").read_text()
    assert "RayTrainWorker" in ray_log
    assert "RayTrainWorker" not in proc.stdout + proc.stderr and "streaming_executor" not in proc.stdout + proc.stderr


@pytest.mark.ray
def test_text_throughput_bench_takes_the_workers_thread_count(tmp_path):
    """--mw-threads (the diagnostic behind the README's 1-thread comparison) replaces plan_cpus's thread count,
    whatever arguments run_trainer passes plan_cpus."""
    data = require_dataset("sst2").parent
    out = tmp_path / "text_throughput.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/text_throughput.py"), "--data-dir", str(data),
                           "--rows", "200", "--epochs", "1", "--workers", "1", "--plain-threads", "1",
                           "--mw-threads", "1", "--repeat", "1", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mw1"]["threads_per_worker"] == 1
    assert "1 thread(s) per worker" in proc.stdout


def test_pretrain_gain_bench_uses_the_sst2_workflows_settings():
    """bench/pretrain_gain.py restates workflows/sst2.py's settings (it must run where pydantic is not
    installed): they must not drift apart."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import pretrain_gain
    finally:
        sys.path.remove(str(REPO / "bench"))
    from modelworks.config import load_workflow

    cfg = load_workflow(REPO / "workflows/sst2.py")
    assert pretrain_gain.MODEL == {k: getattr(cfg.model, k) for k in pretrain_gain.MODEL}
    assert pretrain_gain.PRETRAIN == {k: getattr(cfg.pretrain, k) for k in pretrain_gain.PRETRAIN}
    assert pretrain_gain.FINETUNE == {k: getattr(cfg.train, k) for k in pretrain_gain.FINETUNE}
    assert cfg.model.d_ff == 4 * cfg.model.d_model  # the bench sizes d_ff as 4 x d_model
    assert cfg.pretrain.drop_contained and cfg.train.optimizer == "adamw" and cfg.train.lr_schedule == "cosine"
    assert cfg.train.grad_accum == 1 and cfg.train.label_smoothing == 0.0 and cfg.pretrain.grad_accum == 1


def test_pretrain_gain_bench_runs_tiny_without_ray(tmp_path):
    """Both arms, tiny, on the CPU: a pre-trained and a from-scratch fine-tune of the same seed, paired in
    the summary; no Ray module loaded (it runs on a GPU machine without Ray)."""
    data = require_dataset("sst2").parent
    out = tmp_path / "pretrain_gain.json"
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "bench/pretrain_gain.py"),
                           "--data-dir", str(data), "--device", "cpu", "--rows", "400", "--seeds", "0",
                           "--pretrain-epochs", "0,2", "--finetune-epochs", "1", "--d-model", "32", "--layers", "1",
                           "--heads", "2", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["data"]["rows"] == {"train": 400, "validation": 872, "test": 1821}
    assert 0 < result["data"]["corpus_rows"] < 400  # whole sentences only (drop_contained)
    jobs = {j["pretrain_epochs"]: j for j in result["jobs"]}
    assert set(jobs) == {0, 2}
    assert jobs[0]["pretrain_history"] == [] and len(jobs[2]["pretrain_history"]) == 2
    assert all(math.isfinite(h["val_loss"]) and 0 <= h["val_accuracy"] <= 1 for h in jobs[2]["pretrain_history"])
    for job in jobs.values():
        r = job["finetune"]["1"]
        assert 0.0 < r["val_accuracy"] <= 1.0 and 0.0 < r["test_accuracy"] <= 1.0
        assert r["val_accuracy"] == r["history"][r["best_epoch"] - 1]["val_accuracy"]
    gain = next(row for row in result["summary"] if row["pretrain_epochs"] == 2)
    assert gain["gain_val"] == [jobs[2]["finetune"]["1"]["val_accuracy"] - jobs[0]["finetune"]["1"]["val_accuracy"]]
    assert "gain val" in proc.stdout
    # Only the parent's imports are logged (workers are spawned); they load what the workers load.
    modules = imported_modules(proc.stderr)
    assert {"torch", "tokenizers", "modelworks.text_steps"} <= modules
    assert not {m for m in modules if m == "ray" or m.startswith("ray.") or m == "pydantic"}
