"""The console a person reads: a run's own lines only, each epoch once, Ray's output in the run's log file
(shown live with --verbose), a worker that dies as one line; a terminal gets colour and a live bar, anything
else plain lines. The first tests need no Ray; the CLI tests run `modelworks run` on a real local Ray."""
from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from modelworks.console import Console

REPO = Path(__file__).resolve().parents[1]
# What Ray itself prints: log levels, actor-prefixed echoes of worker output, Train's controller and cleaner.
RAY_LINE = re.compile(r"\bINFO\b|\(RayTrainWorker pid=|PlacementGroupCleaner|\(TrainController pid=|"
                      r"streaming_executor|\(pid=\d+\)")


def events(epochs: int, restart_after: int | None = None) -> list[dict]:
    out = [{"kind": "start", "epochs": epochs, "first_epoch": 1, "batches": 10}]
    for e in range(1, epochs + 1):
        out.append({"kind": "batch", "epoch": e, "batch": 5, "rate": 1000.0, "loss": 0.5})
        out.append({"kind": "epoch", "epoch": e, "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.9,
                    "samples_per_s": 1000.0})
        if e == restart_after:
            out.append({"kind": "start", "epochs": epochs, "first_epoch": e + 1, "batches": 10})
    return out


def test_plain_console_prints_each_epoch_once_and_a_restart_as_one_line():
    stream = io.StringIO()  # not a terminal: plain lines
    console = Console(stream)
    with console.step("[3/5]", "train", "1 worker(s), 4 epochs", announce=True) as step:
        with console.training("", max_attempts=2) as on_event:
            for event in events(4, restart_after=2):
                on_event(event)
        step["result"] = "best checkpoint_epoch=4"
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "[3/5] train: 1 worker(s), 4 epochs"
    for e in range(1, 5):
        assert sum(f"epoch {e}/4 " in ln for ln in lines) == 1
    restart = [ln for ln in lines if "worker died" in ln]
    assert restart == ["      a training worker died; training resumed from checkpoint_epoch=2 (attempt 2 of 2)"]
    assert re.fullmatch(r"\[3/5\] train +\d+\.\d s  best checkpoint_epoch=4", lines[-1])
    assert len(lines) == 1 + 4 + 1 + 1


def test_terminal_console_draws_a_live_bar_that_leaves_no_lines_behind():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    console = Console(stream)
    with console.training("", max_attempts=1) as on_event:
        for event in events(3):
            on_event(event)
    raw = stream.getvalue()
    assert "\x1b[" in raw  # colour and cursor control: it is a terminal
    # The bar redraws in place and erases itself at the end: what stays on screen is the three epochs.
    lines = screen_lines(raw.replace("\n", "\r\n"))  # what a terminal's output processing does
    assert [ln.split()[:2] for ln in lines] == [["epoch", "1/3"], ["epoch", "2/3"], ["epoch", "3/3"]], lines


def _search(view) -> None:
    """What a 3-trial search's callbacks tell the view: two trials report, one is stopped at epoch 1."""
    view.update("t_00000", state="RUNNING", config={"lr": 0.003125, "batch_size": 64})
    view.update("t_00001", state="RUNNING", config={"lr": 0.0002, "batch_size": 32})
    view.result("t_00000", 1, 0.91, {"lr": 0.003125, "batch_size": 64})
    view.result("t_00001", 1, 0.61, {"lr": 0.0002, "batch_size": 32})
    view.update("t_00001", state="STOPPED")
    view.console.event("      trial t_00001 stopped by ASHA after epoch 1")
    view.result("t_00000", 2, 0.89, {"lr": 0.003125, "batch_size": 64})
    view.update("t_00000", state="DONE")


def test_search_trials_are_a_live_table_on_a_terminal_and_lines_elsewhere():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    plain = io.StringIO()
    console = Console(plain)
    with console.trials(3, 2, "val_accuracy") as view:
        _search(view)
        assert view.counts() == "0 running, 1 stopped, 1 done, 1 pending of 3"
        assert view.rows["t_00000"]["best"] == 0.91  # the best epoch, not the last
    assert plain.getvalue().splitlines() == [
        "      trial t_00000 epoch 1/2  val_accuracy=0.9100  (2 running, 0 done, 1 pending of 3)",
        "      trial t_00001 epoch 1/2  val_accuracy=0.6100  (2 running, 0 done, 1 pending of 3)",
        "      trial t_00001 stopped by ASHA after epoch 1",
        "      trial t_00000 epoch 2/2  val_accuracy=0.8900  (1 running, 1 stopped, 0 done, 1 pending of 3)"]

    tty = Tty()
    with Console(tty).trials(3, 2, "val_accuracy") as view:
        _search(view)
        view.live.refresh()
        # While the search runs, the table is on screen: a row per trial with its state, epoch and params.
        shown = screen_lines(tty.getvalue().replace("\n", "\r\n"))
        row = next(ln for ln in shown if "t_00000" in ln).split()
        assert row == ["t_00000", "DONE", "2/2", "0.8900", "0.9100", "64", "0.003125"], shown  # batch_size, lr
        assert any(ln.split()[:3] == ["t_00001", "STOPPED", "1/2"] for ln in shown), shown
        assert shown[-1].strip() == "0 running, 1 stopped, 1 done, 1 pending of 3", shown
    # It redraws in place and erases itself at the end; what stays is the event line (no per-result lines).
    assert screen_lines(tty.getvalue().replace("\n", "\r\n")) == ["      trial t_00001 stopped by ASHA after epoch 1"]


# ------------------------------------------------------------------------------------------- the CLI
def _env(**extra) -> dict:
    # A test's CLI starts its own private Ray, never one a developer left running on the machine.
    return {**os.environ, "MODELWORKS_JOIN_RAY": "0", **extra}


def run_in_terminal(args: list[str], timeout: float) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin/stdout/stderr, as a person at a terminal would."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "modelworks.cli", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=_env(), start_new_session=True, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait(timeout=60)
    os.close(master)
    return rc, b"".join(chunks).decode("utf-8", "replace")


def screen_lines(raw: str) -> list[str]:
    """The lines a person is left with on the terminal (pyte plays the output on a virtual terminal: the
    live bar's redraws and its final erase happen as they would on screen)."""
    import pyte

    screen = pyte.Screen(300, 400)
    pyte.Stream(screen).feed(raw)
    return [ln.rstrip() for ln in screen.display if ln.strip()]


@pytest.mark.slow
def test_digits_run_in_a_terminal_is_short_and_has_no_ray_lines(modelworks_home):
    rc, raw = run_in_terminal(["run", str(REPO / "workflows/digits.py")], timeout=600)
    lines = screen_lines(raw)
    assert rc == 0, "\n".join(lines[-40:])
    assert "\x1b[" in raw  # a terminal: colour and the live bar
    assert not [ln for ln in lines if RAY_LINE.search(ln)], "\n".join(lines)
    for e in range(1, 21):
        assert sum(f"epoch {e}/20 " in ln for ln in lines) == 1, (e, "\n".join(lines))
    assert len(lines) <= 32, "\n".join(lines)
    assert any(ln.startswith("model:") and "digits@1" in ln for ln in lines)
    # Nothing of Ray's was lost: it is in the run's log.
    log = next((modelworks_home / "runs").glob("*/logs/ray.log")).read_text()
    assert "RayTrainWorker" in log and log.count("[modelworks] epoch 20/20") == 1  # each worker line once


def _worker_pids(under: int | None = None) -> set[int]:
    """Ray Train worker processes on this machine (their process title starts with ray::RayTrainWorker); with
    ``under``, only descendants of that process: a CLI's private Ray (raylet, then its workers) is started by
    the CLI, so another job's Ray Train workers on a shared machine are not counted as this run's."""
    from tests.test_cluster import _pids_of

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == under:
                return True
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                return False
        return False

    return {p for p in _pids_of("ray::RayTrainWorker") if under is None or descends(p)}


@pytest.mark.slow
def test_a_killed_worker_is_one_line(modelworks_home):
    """Without a terminal: plain lines, no control codes; a SIGKILLed training worker shows up as one line
    about the restart (the run then finishes). (--verbose showing Ray's own lines: test_a_run_joins_a_running_ray.)"""
    before = _worker_pids()
    args = ["run", str(REPO / "workflows/digits.py"), "--set", "train.epochs=5", "--set", "train.batch_size=2",
            "--set", "train.max_failures=1", "--name", "killed"]
    proc = subprocess.Popen([sys.executable, "-m", "modelworks.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    run_dir = modelworks_home / "runs" / "killed"
    deadline = time.time() + 400
    while not (run_dir / "checkpoint_epoch=2" / "sha256sums").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended or stalled before epoch 2"
        time.sleep(0.05)
    workers = _worker_pids(under=proc.pid) - before
    assert len(workers) == 1, workers
    os.kill(workers.pop(), signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "\x1b" not in out
    lines = out.splitlines()
    assert not [ln for ln in lines if RAY_LINE.search(ln)], out
    restarts = [ln for ln in lines if "worker died" in ln]
    assert len(restarts) == 1 and "(attempt 2 of 2)" in restarts[0], out
    assert sum("epoch 5/5 " in ln for ln in lines) == 1
    history = json.loads((run_dir / "checkpoint_epoch=5" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_run_joins_a_running_ray(modelworks_home):
    """`ray start --head` once; a later run joins that Ray instead of starting its own (ray_private reads the
    address file `ray start` writes: this pins its format). The run is --verbose: it shows Ray's own lines
    and writes no run log (one 1-epoch digits run checks both; each costs a CLI run of its own otherwise)."""
    from modelworks.serve.testing import free_port

    ray_bin = Path(sys.executable).parent / "ray"
    # Its own address file, not the machine's; a short path, as Ray's socket paths must stay under 108 bytes.
    temp = tempfile.mkdtemp(prefix="mwray", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": temp}
    env.pop("MODELWORKS_JOIN_RAY", None)
    port = free_port()
    marker = f"{temp}/ray"  # in the command line of every process of this Ray: how the test stops only those
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={marker}"], env=env, check=True, capture_output=True,
                   timeout=120, start_new_session=True)
    try:
        run = subprocess.run([sys.executable, "-m", "modelworks.cli", "run", str(REPO / "workflows/digits.py"),
                              "--set", "train.epochs=1", "--set", "registry.enabled=false", "--name", "verbose",
                              "--verbose"],
                             capture_output=True, text=True, env={**env, "MODELWORKS_PROGRESS": "0"}, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        header = run.stdout.splitlines()[0]
        assert "Ray running on this machine" in header and f":{port}" in header, header
        # --verbose: Ray's own lines reach the terminal, and no run log takes them.
        assert RAY_LINE.search(run.stdout + run.stderr), run.stdout[-2000:] + run.stderr[-2000:]
        assert not (modelworks_home / "runs" / "verbose" / "logs").exists()
    finally:
        from tests.test_cluster import stop_own_cluster  # never `ray stop`: it would stop every Ray here

        survivors = stop_own_cluster(marker)
        shutil.rmtree(temp, ignore_errors=True)
        assert not survivors, f"could not stop our Ray processes {survivors}"
