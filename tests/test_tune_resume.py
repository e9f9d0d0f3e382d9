"""Fault: SIGKILL the `modelworks tune` driver mid-search; `--resume` finishes it and reruns no finished trial.

Tune copies its state to the search directory in a background thread, rewriting the files in place, so a
kill can land mid-copy (once on CI: the resume then knew 1 of 4 trials). The test tears Tune's copy the way
such a kill does, so `--resume` has to work from the copy modelworks keeps (modelworks/tune/state.py) every time.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelworks.tune import read_attempts, trial_checkpoints

REPO = Path(__file__).resolve().parents[1]
MODELWORKS = Path(sys.executable).with_name("modelworks")
ARGS = [str(REPO / "workflows" / "digits.py"), "--set", "search.num_samples=4", "--set", "search.max_epochs=4",
        "--set", "search.scheduler=fifo", "--set", "search.random_seed=3", "--json",
        # 2 waves of 2 trials: all 4 at once (the default) finish together, leaving no moment when one trial
        # is done and another is mid-way to kill the driver at.
        "--set", "search.max_concurrent=2"]


def _events(search_dir: Path) -> dict[str, list[dict]]:
    """Each trial's events so far (a line a running trial is writing is skipped)."""
    return {f.stem: read_attempts(f) for f in sorted((search_dir / "attempts").glob("*.jsonl"))}


def _search_dir(home: Path) -> Path | None:
    found = list((home / "runs").glob("digits-search-*")) if (home / "runs").is_dir() else []
    return found[0] if found else None


def _tear_tunes_copy(search_dir: Path) -> None:
    """What a kill during Tune's copy leaves: the trial list cut mid-file, the searcher state empty."""
    (state,) = search_dir.glob("experiment_state-*.json")
    text = state.read_text()
    state.write_text(text[: len(text) // 2])
    (searcher,) = search_dir.glob("basic-variant-state-*.json")
    searcher.write_bytes(b"")


@pytest.mark.ray
@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(modelworks_home, tmp_path):
    env = {**os.environ, "MODELWORKS_HOME": str(modelworks_home), "MODELWORKS_PROGRESS": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    env.pop("RAY_ADDRESS", None)
    log1 = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([str(MODELWORKS), "tune", *ARGS], env=env, stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the driver and the Ray it started
    finished_before: set[str] = set()
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            d = _search_dir(modelworks_home)
            if d is not None:
                ev = _events(d)
                finished_before = {t for t, e in ev.items() if any(x["event"] == "end" for x in e)}
                reached = {t: [x["epoch"] for x in e if x["event"] == "epoch"] for t, e in ev.items()}
                # Mid-way with >= 2 of its 4 epochs still to run, so it cannot finish before the kill lands.
                running = [t for t in ev if t not in finished_before and reached[t] and max(reached[t]) <= 2]
                if finished_before and running:  # >= 1 trial done and another one mid-way
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"search ended before it could be killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
        assert finished_before, "no trial finished in time"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log1.close()
    time.sleep(2)
    search_dir = _search_dir(modelworks_home)
    before = _events(search_dir)
    _tear_tunes_copy(search_dir)
    finished_before = {t for t, e in before.items() if any(x["event"] == "end" for x in e)}

    # Without --resume the existing search is refused (one line, exit 2).
    refused = subprocess.run([str(MODELWORKS), "tune", *ARGS], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run([str(MODELWORKS), "tune", *ARGS, "--resume"], env=env, capture_output=True, text=True,
                             timeout=420)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    after = _events(search_dir)

    assert len(summary["trials"]) == 4
    assert all(r["status"] == "completed" and r["epochs"] == 4 for r in summary["trials"]), summary["trials"]
    for trial in finished_before:  # finished trials were not run again: no new start, no new epoch
        assert after[trial] == before[trial], f"finished trial {trial} ran again after --resume"
    attempts = {r["trial_id"]: r["attempts"] for r in summary["trials"]}
    assert all(attempts[t] == 1 for t in finished_before)
    interrupted = [t for t in before if t not in finished_before]
    assert interrupted, "nothing was interrupted"
    for trial in interrupted:  # an interrupted trial goes on from its newest checkpoint: no epoch trained twice
        new = after[trial][len(before[trial]):]
        done_before = [x["epoch"] for x in before[trial] if x["event"] == "epoch"]
        resumed_from = next((x["from_epoch"] for x in new if x["event"] == "resume"), 0)
        assert attempts[trial] == 2
        assert resumed_from >= max(done_before, default=0), \
            f"interrupted trial {trial} went back to epoch {resumed_from} though it had logged {done_before}"
        assert [x["epoch"] for x in new if x["event"] == "epoch"] == list(range(resumed_from + 1, 5)), new
    for trial in summary["trials"]:  # train.keep_checkpoints=2: each trial keeps its 2 best epochs and the newest
        saved = trial_checkpoints(search_dir / trial["trial_id"])
        epochs = sorted(json.loads((c / "metrics.json").read_text())["epoch"] for _, c in saved)
        assert epochs[-1] == 4 and 2 <= len(epochs) <= 3, epochs
    assert summary["test_accuracy"] > 0.8 and summary["model"].startswith("digits@")
