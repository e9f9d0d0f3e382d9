"""What a person watching a search sees while it runs: one line per trial result, and one line for each
event that matters (a trial stopped by ASHA, a trial that failed), from Tune's callbacks in the driver.

    trial 3f2a_00001 epoch 2/4  val_acc=0.8571  (2 running, 1 stopped, 1 done of 4)
    trial 3f2a_00002 stopped by ASHA after epoch 1 (val_accuracy 0.6103, below the rung's cut)
"""
from __future__ import annotations

from ray import tune

# The driver's console, set by search_trials before each fit. Not an attribute: Tune pickles its callbacks
# with the search (a resumed search gets them back from there), and a console holds a terminal stream.
_console = None


def attach(console) -> None:
    global _console
    _console = console


class TrialEvents(tune.Callback):
    def __init__(self, epochs_max: int, metric: str, num_samples: int, scheduler: str):
        self.epochs_max, self.metric, self.num_samples, self.scheduler = epochs_max, metric, num_samples, scheduler
        self.stopped: set[str] = set()

    @property
    def console(self):
        return _console or (lambda line: None)

    def _counts(self, trials: list) -> str:
        running = sum(t.status == "RUNNING" for t in trials)
        done = sum(t.status == "TERMINATED" for t in trials) - len(self.stopped)
        stopped = f"{len(self.stopped)} stopped, " if self.stopped else ""
        return f"({running} running, {stopped}{done} done of {self.num_samples})"

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if "epoch" not in result or self.metric not in result:
            return
        self.console(f"      trial {trial.trial_id} epoch {result['epoch']}/{self.epochs_max}  "
                     f"{self.metric}={result[self.metric]:.4f}  {self._counts(trials)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        epoch = last.get("epoch", 0)
        if epoch < self.epochs_max:  # ended before max epochs without an error: the scheduler stopped it
            self.stopped.add(trial.trial_id)
            value = f" ({self.metric} {last[self.metric]:.4f}, below the rung's cut)" if self.metric in last else ""
            self._event(f"      trial {trial.trial_id} stopped by {self.scheduler.upper()} after epoch {epoch}{value}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._event(f"      trial {trial.trial_id} failed after epoch {(trial.last_result or {}).get('epoch', 0)}; "
                    f"its error is in {getattr(trial, 'local_path', None) or 'the trial folder'}")

    def _event(self, line: str) -> None:
        console = self.console
        (console.event if hasattr(console, "event") else console)(line)
