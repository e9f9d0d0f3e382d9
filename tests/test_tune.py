"""Hyperparameter search: resource planning (pure), a real ASHA search on digits, infeasible searches, multi-worker.

The integration tests run real Ray Tune trials on the session's local Ray (2 CPUs), on shrunken budgets.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from modelworks import checkpoint
from modelworks.config import SearchConfig, apply_overrides, load_workflow
from modelworks.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "workflows" / "digits.py"


def _cfg(*overrides: str):
    return apply_overrides(load_workflow(DIGITS), list(overrides))


# ------------------------------------------------------------------------------------- pure: no Ray
def test_a_resumed_search_shows_trials_that_ended_before_it_as_ended():
    """The trials view of a resumed search: trials Tune restored as finished are shown done, stopped or failed
    (from their last result), not pending. Tune's callback is called with stand-ins for its Trial objects."""
    import io
    from types import SimpleNamespace as Trial

    from modelworks.console import Console
    from modelworks.tune import events

    ended = [Trial(trial_id="t_0", status="TERMINATED", last_result={"epoch": 4, "val_accuracy": 0.9}, config={}),
             Trial(trial_id="t_1", status="TERMINATED", last_result={"epoch": 1, "val_accuracy": 0.5}, config={}),
             Trial(trial_id="t_2", status="ERROR", last_result={}, config={})]
    running = Trial(trial_id="t_3", status="RUNNING", last_result={}, config={"train.lr": 0.01})
    with Console(io.StringIO()).trials(5, 4, "val_accuracy") as view:
        events.attach(view)
        try:
            events.TrialEvents(4, "val_accuracy", "asha").on_trial_start(0, [*ended, running], running)
        finally:
            events.attach(None)
        assert {t: r["state"] for t, r in view.rows.items()} == {"t_0": "DONE", "t_1": "STOPPED", "t_2": "FAILED",
                                                                 "t_3": "RUNNING"}
        assert view.rows["t_0"]["value"] == 0.9 and view.rows["t_1"]["epoch"] == 1
        assert view.counts() == "1 running, 1 stopped, 1 failed, 1 done, 1 pending of 5"


def test_space_keys_are_resolved_and_checked():
    s = SearchConfig(space={"lr": {"loguniform": [1e-4, 1e-2]}, "model.dropout": [0.0, 0.2], "hidden_sizes": None})
    assert s.space == {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.dropout": [0.0, 0.2]}
    for bad in ({"train.nope": [1]}, {"lr": {"loguniform": [0, 1]}}, {"lr": {"gaussian": [0, 1]}},
                {"lr": {"uniform": [2, 1]}}, {"dropout": []}):
        with pytest.raises(ValueError):
            SearchConfig(space=bad)


def test_cli_set_can_add_a_dimension_with_a_short_key():
    cfg = _cfg('search.space.optimizer=["adam", "sgd"]')
    assert cfg.search.space["train.optimizer"] == ["adam", "sgd"]
    with pytest.raises(UserError, match="not a field"):
        _cfg("search.space.bogus=[1, 2]")


def test_trial_config_applies_samples_and_the_epoch_budget():
    from modelworks.tune import trial_config

    cfg = _cfg("search.max_epochs=7", "search.enabled=true")
    t = trial_config(cfg, {"train.lr": 0.01, "model.hidden_sizes": [32]})
    assert (t.train.lr, t.model.hidden_sizes, t.train.epochs, t.search.enabled) == (0.01, [32], 7, False)
    with pytest.raises(UserError):  # a sampled value the config rejects fails loudly
        trial_config(cfg, {"model.dropout": 1.5})


def test_plan_leaves_cpu_for_data_and_runs_all_trials_together_on_cpu_shares():
    from modelworks.tune import plan_trials, trial_memory_bytes

    # 2 CPUs, 8 trials: all 8 at once (ASHA needs peers at a rung) on 1/8 of the 1 free CPU, 1 thread each.
    two = plan_trials(_cfg(), {"CPU": 2.0}, physical_cpus=2)
    assert (two.concurrency, two.trial_cpus, two.threads) == (8, 0.125, 1)
    seven = plan_trials(_cfg("search.num_samples=7"), {"CPU": 2.0}, physical_cpus=2)
    assert seven.concurrency == 7 and seven.concurrency * seven.trial_cpus <= 2 - 1  # shares rounded down
    eight = plan_trials(_cfg("search.num_samples=16"), {"CPU": 8.0}, physical_cpus=8)
    assert eight.concurrency == 16 and eight.concurrency * eight.trial_cpus <= 8 - 1
    three = plan_trials(_cfg("search.num_samples=3"), {"CPU": 8.0})  # never more than trials, <= 1 CPU each
    assert (three.concurrency, three.trial_cpus) == (3, 1.0)
    # Caps: the CPU floor per trial, search.max_concurrent, search.cpus_per_trial, memory.
    assert plan_trials(_cfg("search.num_samples=50"), {"CPU": 2.0}).concurrency == 10
    capped = plan_trials(_cfg("search.max_concurrent=2"), {"CPU": 2.0}, physical_cpus=2)
    assert (capped.concurrency, capped.trial_cpus) == (2, 0.5)
    assert plan_trials(_cfg("search.cpus_per_trial=0.25"), {"CPU": 2.0}).concurrency == 4
    per_trial = trial_memory_bytes(1, 200 * 2**20)
    mem = plan_trials(_cfg(), {"CPU": 2.0, "memory": 3.5 * per_trial}, physical_cpus=2, trial_bytes=per_trial)
    assert (mem.concurrency, mem.trial_cpus) == (3, 0.3333) and "memory" in mem.why
    dist = plan_trials(_cfg("train.workers=2"), {"CPU": 2.0}, physical_cpus=2)
    assert dist.workers == 2 and dist.trial_cpus <= 1.0 and dist.concurrency == 1
    # A worker count from the space counts too: the largest choice must fit.
    spaced = plan_trials(_cfg('search.space.workers=[1, 3]'), {"CPU": 4.0}, physical_cpus=4)
    assert spaced.workers == 3 and spaced.trial_cpus <= 3.0


def test_rungs_and_which_peers_a_trial_waits_for_at_a_rung(tmp_path):
    import os
    import socket
    import subprocess

    from modelworks.tune import asha_rungs, peers_behind

    assert asha_rungs(_cfg()) == [2, 6, 18]  # digits: 20 epochs, grace 2, factor 3
    assert asha_rungs(_cfg("search.max_epochs=4", "search.grace_period=1", "search.reduction_factor=2")) == [1, 2]
    assert asha_rungs(_cfg("search.scheduler=fifo")) == []

    dead = subprocess.Popen(["true"])
    dead.wait()
    host, me = socket.gethostname(), os.getpid()
    logs = {
        "behind": [("start", "s1", me), ("epoch", 1)],
        "ahead": [("start", "s1", me), ("epoch", 1), ("epoch", 2)],
        "ended": [("start", "s1", me), ("epoch", 1), ("end", "s1", me)],
        "crashed": [("start", "s1", dead.pid), ("epoch", 1)],
        "old_session": [("start", "s0", me), ("epoch", 1)],
        "resumed": [("start", "s0", me), ("epoch", 1), ("start", "s1", me)],
        "self": [("start", "s1", me)],
    }
    (tmp_path / "attempts").mkdir()
    for trial, events in logs.items():
        lines = [json.dumps({"event": e[0], "epoch": e[1]} if e[0] == "epoch" else
                            {"event": e[0], "session": e[1], "pid": e[2], "host": host}) for e in events]
        (tmp_path / "attempts" / f"{trial}.jsonl").write_text("\n".join(lines) + "\n")
    assert sorted(peers_behind(tmp_path, "s1", "self", 2)) == ["behind", "resumed"]
    assert peers_behind(tmp_path, "s1", "self", 1) == []  # "resumed" reported epoch 1 before its restart


@pytest.mark.parametrize("overrides, match", [
    (("search.cpus_per_trial=4",), "never start"),
    (("train.workers=16",), "never start"),
    (("train.use_gpu=true",), "GPU"),
])
def test_plan_refuses_a_search_that_can_never_be_scheduled(overrides, match):
    from modelworks.tune import plan_trials

    with pytest.raises(UserError, match=match):
        plan_trials(_cfg(*overrides), {"CPU": 2.0}, physical_cpus=2)
    with pytest.raises(UserError, match="more CPUs"):
        plan_trials(_cfg(), {"CPU": 1.0})


# ------------------------------------------------------------------------------- real local Ray
def _wait_resources_back(ray, timeout=30.0) -> tuple[float, float]:
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= total - 1e-6:
            break
        time.sleep(0.5)
    return ray.available_resources().get("CPU", 0.0), total


@pytest.mark.ray
@pytest.mark.slow
def test_asha_search_on_digits_finishes_stops_trials_early_and_registers_the_best(ray_local):
    """`modelworks run` with search.enabled: 5 real trials, ASHA stops some; resources all come back."""
    from modelworks.registry import Registry
    from modelworks.workflow import run_workflow

    cfg = _cfg("search.enabled=true", "search.num_samples=5", "search.max_epochs=4", "search.grace_period=1",
               "search.reduction_factor=2", 'search.space.lr={"loguniform": [1e-5, 3e-2]}', "search.random_seed=1")
    t0 = time.time()
    lines = []
    result = run_workflow(cfg, log=lines.append)
    elapsed = time.time() - t0

    rows = json.loads((Path(result.run_dir) / "trials.json").read_text())
    assert len(rows) == 5 and all(r["status"] in ("completed", "stopped") for r in rows)
    stopped = [r for r in rows if r["status"] == "stopped"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert stopped, f"ASHA stopped no trial: {rows}"
    assert completed and all(r["epochs"] == 4 for r in completed)
    # The trials ran together (time-sliced on fractional CPUs), not one after another: at some moment at
    # least 4 of the 5 were alive at once (trial intervals from the trial table overlap).
    intervals = [(r["started_at"], r["ended_at"]) for r in rows]
    peak = max(sum(1 for s, e in intervals if s <= t <= e) for t, _ in intervals)
    assert peak >= 4, f"trials did not run concurrently: {intervals}"
    # ...and met at the first rung (epoch 1): no trial reported epoch 2 before every trial had reported epoch 1.
    events = [json.loads(x) for f in (Path(result.run_dir) / "attempts").glob("*.jsonl")
              for x in f.read_text().splitlines()]
    first_epoch2 = min(e["time"] for e in events if e.get("epoch") == 2)
    assert all(e["time"] < first_epoch2 for e in events if e.get("epoch") == 1), "a trial passed rung 1 alone"
    assert all(r["epochs"] < 4 for r in stopped)  # stopped trials used fewer epochs
    assert all(len(r["history"]) == r["epochs"] for r in rows)
    # The console as the search went: a line per trial result, and one event line per trial ASHA stopped.
    for r in rows:
        results = [x for x in lines if re.match(rf"\s+trial {r['trial_id']} epoch \d/4  val_accuracy=", x)]
        assert len(results) == r["epochs"], (r["trial_id"], results)
        stops = [x for x in lines if f"trial {r['trial_id']} stopped by ASHA after epoch {r['epochs']} " in x]
        assert len(stops) == (r["status"] == "stopped"), (r, stops)
    for name in ("trials.csv", "trials.json", "trials_val_accuracy.png"):
        assert (Path(result.run_dir) / name).stat().st_size > 0
    assert (Path(result.run_dir) / "trials.csv").read_text().count("\n") == 6

    # The best trial is chosen by validation accuracy and its checkpoint loads and scores.
    assert result.val_accuracy == pytest.approx(max(r["best_val_accuracy"] for r in rows))
    loaded = checkpoint.load(result.checkpoint)
    assert result.test_accuracy > 0.8 and loaded.metrics["val_accuracy"] == pytest.approx(result.val_accuracy)
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    pred = loaded.predict_proba(d.data[:200].astype(np.float32)).argmax(1).numpy()
    assert (pred == d.target[:200]).mean() > 0.8

    reg = Registry()
    name, version = reg.resolve(result.model)
    info = reg.info(name, version)
    assert info["search"]["best_trial"] in result.run and len(info["trials"]) == 5
    assert info["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert result.production == (result.test_accuracy >= cfg.registry.min_accuracy)
    # The search is a step of the same graph: evaluate and register took its checkpoint as after `train`.
    steps = {s["name"]: s for s in json.loads((Path(result.run_dir) / "manifest.json").read_text())["steps"]}
    assert list(steps) == ["ingest", "preprocess", "search", "evaluate", "register"]
    assert steps["evaluate"]["inputs"]["upstream"]["search"] == steps["search"]["key"]
    assert steps["search"]["outputs"]["value"]["checkpoint"] == result.checkpoint
    assert checkpoint.sha256(reg.checkpoint_dir(name, version) / "model.safetensors") == \
        checkpoint.sha256(Path(result.checkpoint) / "model.safetensors")
    assert steps["register"]["outputs"]["value"]["model"] == result.model

    available, total = _wait_resources_back(ray_local)
    assert available == pytest.approx(total), "trials stopped by ASHA still hold CPUs"
    print(f"\n5-trial ASHA digits search: {elapsed:.0f} s, epochs {[r['epochs'] for r in rows]}")


@pytest.mark.ray
def test_tune_cli_fails_at_once_when_a_trial_can_never_be_scheduled(ray_local, capsys):
    from modelworks.cli import main

    t0 = time.time()
    # --verbose: the process's own stdout/stderr stay where pytest captures them (without it, the CLI sends
    # them to the search's log once its folder exists, as `modelworks run` does).
    rc = main(["tune", str(DIGITS), "--verbose", "--set", "train.workers=4", "--set", "search.cpus_per_trial=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "never start" in err and err.count("\n") == 1
    assert time.time() - t0 < 10


@pytest.mark.ray
def test_tune_refuses_an_existing_search_without_resume(ray_local, capsys, modelworks_home):
    from modelworks.cli import main
    from modelworks.tune import search_name

    cfg = _cfg("search.enabled=true")
    d = modelworks_home / "runs" / search_name(cfg)
    d.mkdir(parents=True)
    (d / "tuner.pkl").write_bytes(b"x")  # what Tuner.can_restore looks for
    assert main(["tune", str(DIGITS)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_trials_run_distributed_and_asha_stopped_ones_release_their_workers(ray_local):
    """A trial asking for 2 workers is a real nested TorchTrainer (DDP); ASHA-stopped ones are aborted
    (the leak of ray-project/ray#54305 would leave their workers holding the CPUs)."""
    from modelworks.tune.cli import run_search

    # 2 workers take both CPUs, so the trials run one after another, each a nested TorchTrainer (~40 s of
    # start-up here). 2 trials are enough: seed 31 samples lr 1.4e-2 then 1.7e-5, so the first runs all 3
    # epochs (ASHA passes the first result at a rung) and the second, far behind it at rung 1, is stopped.
    cfg = _cfg("search.enabled=true", "search.num_samples=2", "search.max_epochs=3", "search.grace_period=1",
               "search.reduction_factor=2", "search.random_seed=31", "train.workers=2", "data.max_rows=600",
               'search.space={"lr": {"loguniform": [1e-5, 3e-2]}}')
    result = run_search(cfg, register=False, log=lambda m: None)
    by_status = {s: [r for r in result.trials if r["status"] == s] for s in ("completed", "stopped")}
    assert by_status["completed"] and by_status["stopped"], result.trials
    assert all(r["epochs"] < 3 for r in by_status["stopped"])
    train_runs = Path(result.search_dir) / "train"  # one real Train run (checkpoint_epoch=N dirs) per trial
    assert sorted(p.name for p in train_runs.iterdir() if p.is_dir()) == sorted(r["trial_id"] for r in result.trials)
    # ...on 2 ranks in 2 worker processes, as each trial's checkpoints record (one rank if it ran on 1 worker).
    from modelworks.train import list_checkpoints
    from tests.conftest import assert_two_ranks

    for trial in result.trials:
        saved = list_checkpoints(train_runs / trial["trial_id"])
        assert saved, trial
        for _, ckpt in saved:
            assert_two_ranks(json.loads((ckpt / "metrics.json").read_text())["workers"])
    assert checkpoint.load(result.best_checkpoint).spec["hidden_sizes"] == [128, 64]
    available, total = _wait_resources_back(ray_local)
    assert available == pytest.approx(total), "Train workers of stopped trials still hold CPUs"
