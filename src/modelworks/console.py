"""What a person sees while a run works, and where Ray's own output goes instead.

    modelworks · workflow digits · run digits-1a2b3c4d · Ray local, 2 CPUs · 1 worker
    [1/5] ingest       0.9 s  digits 'digits'; registers as 'digits'
    [2/5] preprocess   0.1 s  input [8, 8], 10 classes, mean=4.8842 std=6.0168
    [3/5] train: 1 worker(s), 20 epochs
          epoch 1/20  train_loss=1.4510  val_loss=0.5634  val_acc=0.8918  21,340 samples/s
          ...
    [3/5] train        6.2 s  best checkpoint_epoch=18 (val_accuracy 0.9840)
    ...

One ``Console`` renders the same calls two ways:
- a terminal (the stream is a TTY): colour, and a one-line live progress bar during training (epoch x/N,
  batches, samples/s or tokens/s, loss, time left) that erases itself; each epoch is printed once above it;
- anything else (CI, ``| tee``, ``ray job submit`` logs): plain lines, no control codes, one line per epoch.

Ray's output (its INFO lines, every worker line echoed to the driver, Ray Data's banners, the controller's
warnings) is not for this console: ``capture_process_output`` points the process's stdout/stderr file
descriptors at ``runs/<run>/logs/ray.log`` and the console keeps a private copy of the terminal. The workers'
progress reaches the console as events (``modelworks.progress``), not as printed lines.
This module does not import Ray.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, TextIO

from rich.console import Console as RichConsole
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

LOG_FILE = "ray.log"  # runs/<run>/logs/ray.log


class Console:
    """The run's console. Calling it prints one note line, so it can stand wherever a ``log`` callable does."""

    def __init__(self, stream: TextIO | None = None, *, write: Callable[[str], None] | None = None,
                 live: bool | None = None, capture_to_run_logs: bool = False) -> None:
        self.stream = stream or sys.stdout
        self._write_line = write
        self.live = bool(live if live is not None else (write is None and self.stream.isatty()))
        self._rich = RichConsole(file=self.stream, force_terminal=self.live, no_color=not self.live,
                                 highlight=False, soft_wrap=True) if write is None else None
        self.capture_to_run_logs = capture_to_run_logs
        self.log_path: Path | None = None
        self.step_seconds: dict[str, float] = {}
        # Per training step: seconds from asking Ray Train for workers to the loop's first step (worker
        # processes, process group, reading the shard): the fixed cost bench/overhead.py breaks down.
        self.trainer_startup_s: dict[str, float] = {}
        self._training: _TrainingView | None = None
        self._trials: _TrialsView | None = None

    @classmethod
    def from_log(cls, log: "Console | Callable[[str], None] | None") -> "Console":
        """Wrap a plain ``log(line)`` callable (tests pass ``print`` or ``list.append``) as a Console."""
        if isinstance(log, Console):
            return log
        return cls(write=log or print)

    def attach_run(self, run_dir: Path) -> None:
        """The run directory is known: from here on Ray's output goes to its logs (when capturing)."""
        if self.capture_to_run_logs and self.log_path is None:
            self.log_path = run_dir / "logs" / LOG_FILE
            capture_process_output(self.log_path)

    # -- lines -----------------------------------------------------------------------------------
    def _emit(self, text: str, style: str | None = None) -> None:
        if self._write_line is not None:
            self._write_line(text)
        elif self._training is not None and self._training.progress is not None:
            self._training.progress.console.print(text, style=style, markup=False)  # above the live bar
        elif self._trials is not None and self._trials.live is not None:
            self._trials.live.console.print(text, style=style, markup=False)  # above the live table
        else:
            self._rich.print(text, style=style, markup=False)

    def __call__(self, line: str) -> None:
        self._emit(line)

    def event(self, line: str) -> None:
        """Something that matters (a restart, a failed gate): one line that stands out on a terminal."""
        self._emit(line, style="bold yellow")

    def header(self, workflow: str, run: str, ray_desc: str, workers: int) -> None:
        self._emit(f"modelworks · workflow {workflow} · run {run} · {ray_desc} · {workers} worker(s)",
                   style="bold")
        if self.log_path is not None:
            self._emit(f"      Ray's output: {self.log_path}", style="dim")

    @contextmanager
    def timed(self, name: str):
        """Time something that is not a step of its own (Ray's start-up): it shows in ``step_times``."""
        t0 = time.perf_counter()
        yield
        self.step_seconds[name] = self.step_seconds.get(name, 0.0) + time.perf_counter() - t0

    @contextmanager
    def step(self, number: str, name: str, what: str = "", announce: bool = False):
        """Time a step; print ``[i/n] name  1.2 s  result`` when it finishes. ``announce`` also prints a line
        when it starts (long steps: their progress comes in between). Yields a dict; set ``result``."""
        if announce:
            self._emit(f"{number} {name}: {what}", style="bold")
        out = {"result": "" if announce else what}
        t0 = time.perf_counter()
        yield out
        self.step_done(number, name, time.perf_counter() - t0, out["result"])

    def step_done(self, number: str, name: str, seconds: float, result: str) -> None:
        """The line of a finished step (also for steps that ran elsewhere, as Ray tasks)."""
        self.step_seconds[name] = self.step_seconds.get(name, 0.0) + seconds
        self._emit(f"{number} {name:<11}{seconds:6.1f} s  {result}", style="green")

    # -- training progress -------------------------------------------------------------------------
    @contextmanager
    def training(self, label: str, max_attempts: int):
        """While a training step runs: ``on_event`` (for ``progress.FollowProgress``) prints each epoch
        once, a restart as one line, and on a terminal drives the live bar."""
        view = _TrainingView(self, label, max_attempts)
        self._training = view
        try:
            yield view.on_event
        finally:
            view.close()
            self._training = None

    @contextmanager
    def trials(self, num_samples: int, epochs: int, metric: str):
        """While a search runs: its trials, as a table redrawn in place on a terminal, else a line per result
        (see ``_TrialsView``). Events (a trial stopped early, one that failed) print as lines either way."""
        view = _TrialsView(self, num_samples, epochs, metric)
        self._trials = view
        try:
            yield view
        finally:
            view.close()
            self._trials = None

    # -- the end -----------------------------------------------------------------------------------
    def summary(self, rows: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            self._emit(f"{key + ':':<{width + 2}}{value}")

    def step_times(self) -> str:
        parts = [f"{name} {s:.1f} s" for name, s in self.step_seconds.items()]
        return " · ".join(parts)


class _TrainingView:
    """Turns progress events into lines (and, on a terminal, a one-line live bar)."""

    def __init__(self, console: Console, label: str, max_attempts: int) -> None:
        self.console, self.label, self.max_attempts = console, label, max_attempts
        self.starts = 0
        self.t0 = time.perf_counter()
        self.epochs = 0
        self.unit = "samples"
        self.steps: int | None = None   # trained by optimizer steps (a language model): the total
        self.batches: int | None = None
        self.progress: Progress | None = None
        self._task = None

    def _bar(self) -> None:
        if not self.console.live or self.console._rich is None or self.progress is not None:
            return
        self.progress = Progress(
            TextColumn("      {task.fields[label]} {task.fields[where]}"),
            BarColumn(bar_width=24), TextColumn("{task.completed}/{task.total} batches"),
            TextColumn("{task.fields[rate]}"), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
            # Not rich's default of routing sys.stdout/stderr above the bar: that is where Ray prints.
            console=self.console._rich, transient=True, redirect_stdout=False, redirect_stderr=False)
        self._task = self.progress.add_task("train", total=None, label=self.label, where="",
                                            rate="", loss="-")
        self.progress.start()

    def on_event(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "start":
            self.starts += 1
            if self.starts == 1:
                self.console.trainer_startup_s[self.label or "train"] = round(time.perf_counter() - self.t0, 2)
            self.epochs, self.unit = event["epochs"], event.get("unit", "samples")
            self.steps, self.batches = event.get("steps"), event.get("batches")
            if self.starts > 1:  # the worker group died and Ray Train started a new one from the checkpoint
                done = event["first_epoch"] - 1
                name = f"checkpoint_step={done * self.batches}" if self.steps else f"checkpoint_epoch={done}"
                origin = name if done else "the start (no checkpoint yet)"
                self.console.event(f"      a training worker died; training resumed from {origin} "
                                   f"(attempt {self.starts} of {self.max_attempts})")
            self._bar()
            if self.progress is not None:
                self.progress.update(self._task, total=event.get("batches"), completed=0,
                                     where=self._where(event["first_epoch"], 0))
        elif kind == "batch" and self.progress is not None:
            self.progress.update(self._task, completed=event["batch"], where=self._where(event["epoch"], event["batch"]),
                                 rate=f"{event['rate']:,.0f} {self.unit}/s", loss=f"{event['loss']:.4f}")
        elif kind == "epoch":
            self.console(epoch_line(self.label, event, self.epochs, self.unit, self.steps))
            if self.progress is not None:
                self.progress.update(self._task, completed=0, where=self._where(min(event["epoch"] + 1, self.epochs), 0))

    def _where(self, epoch: int, batch: int) -> str:
        if self.steps:
            return f"step {min((epoch - 1) * (self.batches or 0) + batch, self.steps)}/{self.steps}"
        return f"epoch {epoch}/{self.epochs}"

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class _TrialsView:
    """A search's trials. On a terminal, a compact table redrawn in place (rich ``Live``) that erases itself
    when the search ends (the summary follows)::

        trial        state     epoch  val_accuracy  best    lr      batch_size
        3f2a_00000   RUNNING   2/4    0.9130        0.9130  0.0031  64
        3f2a_00001   STOPPED   1/4    0.6103        0.6103  0.0002  32
        2 running, 1 stopped, 0 done, 1 pending of 4

    Anywhere else, a plain line per trial result, as CI logs and ``| tee`` want::

        trial 3f2a_00000 epoch 2/4  val_accuracy=0.9130  (2 running, 1 stopped, 0 done, 1 pending of 4)
    States: PENDING, RUNNING, DONE (all epochs), STOPPED (by the scheduler), FAILED."""

    def __init__(self, console: Console, num_samples: int, epochs: int, metric: str) -> None:
        self.console, self.num_samples, self.epochs, self.metric = console, num_samples, epochs, metric
        self.rows: dict[str, dict] = {}
        self.live: Live | None = None
        if console.live and console._rich is not None:
            self.live = Live(self.table(), console=console._rich, refresh_per_second=4, transient=True,
                             redirect_stdout=False, redirect_stderr=False)  # Ray prints to stdout; not above us
            self.live.start()

    def update(self, trial_id: str, *, state: str | None = None, epoch: int | None = None,
               value: float | None = None, config: dict | None = None) -> None:
        row = self.rows.setdefault(trial_id, {"state": "PENDING", "epoch": 0, "value": None, "best": None,
                                              "config": {}})
        if state is not None:
            row["state"] = state
        if epoch is not None:
            row["epoch"] = epoch
        if value is not None:
            row["value"], row["best"] = value, value if row["best"] is None else max(row["best"], value)
        if config:
            row["config"] = config
        if self.live is not None:
            self.live.update(self.table())

    def result(self, trial_id: str, epoch: int, value: float, config: dict) -> None:
        """A trial reported an epoch: its row on a terminal, a line anywhere else."""
        self.update(trial_id, state="RUNNING", epoch=epoch, value=value, config=config)
        if self.live is None:
            self.console(f"      trial {trial_id} epoch {epoch}/{self.epochs}  {self.metric}={value:.4f}  "
                         f"({self.counts()})")

    def counts(self) -> str:
        states = [r["state"] for r in self.rows.values()]
        pending = self.num_samples - len(states) + states.count("PENDING")
        parts = [f"{states.count('RUNNING')} running"] + [f"{states.count(s)} {s.lower()}" for s in
                                                           ("STOPPED", "FAILED") if states.count(s)]
        return ", ".join(parts + [f"{states.count('DONE')} done", f"{pending} pending"]) + f" of {self.num_samples}"

    def table(self) -> Table:
        """The rows, as wide as the terminal allows: the hyperparameters (by their last name part, ``lr`` for
        ``train.lr``) fill the columns left after trial, state, epoch and the scores; those that differ
        between trials first, each group in name order."""
        score = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        param = lambda v: ("-" if v is None else f"{v:.4g}" if isinstance(v, float)  # noqa: E731
                           else ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
        rows = sorted(self.rows.items())
        columns = {"      trial": [f"      {t}" for t, _ in rows], "state": [r["state"] for _, r in rows],
                   "epoch": [f"{r['epoch']}/{self.epochs}" for _, r in rows],
                   self.metric: [score(r["value"]) for _, r in rows], "best": [score(r["best"]) for _, r in rows]}
        width = lambda title, cells: max([len(title), *map(len, cells)]) + 2  # noqa: E731
        room = self.console._rich.width - sum(width(t, c) for t, c in columns.items())  # drawn on a terminal only
        params = {k.rsplit(".", 1)[-1]: [param(r["config"].get(k)) for _, r in rows]
                  for k in {k for _, r in rows for k in r["config"]}}
        for title, cells in sorted(params.items(), key=lambda kv: (len(set(kv[1])) == 1, kv[0])):
            if width(title, cells) > room:
                break
            room -= width(title, cells)
            columns[title] = cells
        table = Table(box=None, pad_edge=False, caption="      " + self.counts(), caption_justify="left",
                      padding=(0, 2, 0, 0))
        for title in columns:
            table.add_column(title, no_wrap=True)
        for cells in zip(*columns.values()):
            table.add_row(*cells)
        return table

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def epoch_line(label: str, m: dict, epochs: int, unit: str, steps: int | None = None) -> str:
    """One epoch (or, for a model trained by steps, one evaluation), as both the console and the worker's
    own log print it."""
    prefix = f"{label} " if label else ""
    where = f"step {m['step']}/{steps}" if steps else f"epoch {m['epoch']}/{epochs}"
    if "val_perplexity" in m:
        score = f"val_ppl={m['val_perplexity']:.2f}"
    elif "val_r2" in m:
        score = f"val_r2={m['val_r2']:.4f}  val_mae={m['val_mae']:.4g}"
    else:
        score = f"val_acc={m['val_accuracy']:.4f}"
    rate = m.get("tokens_per_s") if unit == "tokens" else m.get("samples_per_s")
    return (f"      {prefix}{where}  train_loss={m['train_loss']:.4f}  "
            f"val_loss={m['val_loss']:.4f}  {score}  {rate or 0:,.0f} {unit}/s")


def capture_process_output(path: Path) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so also what Ray's threads and C++
    core write there) at ``path``. Call once the console holds its own copy of the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def terminal_copy(fd: int) -> TextIO:
    """A line-buffered text stream on a duplicate of ``fd``: still the terminal after fd is redirected."""
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
