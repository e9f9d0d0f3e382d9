"""What a person watching a search sees while it runs, from Tune's callbacks in the driver: the trials (on a
terminal a table redrawn in place, elsewhere one line per trial result, see ``console._TrialsView``), and one
line for each event that matters (a trial stopped by ASHA, a trial that failed).

    trial 3f2a_00001 epoch 2/4  val_accuracy=0.8571  (2 running, 1 stopped, 1 done, 0 pending of 4)
    trial 3f2a_00002 stopped by ASHA after epoch 1 (val_accuracy 0.6103, below the rung's cut)
"""
from __future__ import annotations

from ray import tune

# The driver's trials view (``Console.trials``), set by search_trials around each fit. Not an attribute: Tune
# pickles its callbacks with the search (a resumed search gets them back from there), and a view holds a
# terminal stream.
_view = None


def attach(view) -> None:
    global _view
    _view = view


class TrialEvents(tune.Callback):
    """Tune's trial events, handed to the view (which keeps the trials' states and counts)."""

    def __init__(self, epochs_max: int, metric: str, scheduler: str):
        self.epochs_max, self.metric, self.scheduler = epochs_max, metric, scheduler

    def _sync(self, trials: list) -> None:
        """Trials that ended before this driver started (a resumed search): shown as they ended, not pending."""
        for t in trials:
            if t.trial_id not in _view.rows and t.status in ("TERMINATED", "ERROR"):
                last = t.last_result or {}
                state = ("FAILED" if t.status == "ERROR" else
                         "DONE" if last.get("epoch", 0) >= self.epochs_max else "STOPPED")
                _view.update(t.trial_id, state=state, epoch=last.get("epoch"), value=last.get(self.metric),
                             config=t.config)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if _view is not None:
            self._sync(trials)
            _view.update(trial.trial_id, state="RUNNING", config=trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if "epoch" not in result or self.metric not in result or _view is None:
            return
        self._sync(trials)
        _view.result(trial.trial_id, result["epoch"], result[self.metric], trial.config)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        epoch = last.get("epoch", 0)
        if epoch < self.epochs_max:  # ended before max epochs without an error: the scheduler stopped it
            value = f" ({self.metric} {last[self.metric]:.4f}, below the rung's cut)" if self.metric in last else ""
            self._event(trial, "STOPPED",
                        f"      trial {trial.trial_id} stopped by {self.scheduler.upper()} after epoch {epoch}{value}")
        elif _view is not None:
            _view.update(trial.trial_id, state="DONE")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._event(trial, "FAILED",
                    f"      trial {trial.trial_id} failed after epoch {(trial.last_result or {}).get('epoch', 0)}; "
                    f"its error is in {getattr(trial, 'local_path', None) or 'the trial folder'}")

    def _event(self, trial, state: str, line: str) -> None:
        if _view is not None:
            _view.update(trial.trial_id, state=state)
            _view.console.event(line)
