"""Hyperparameter search with Ray Tune: ASHA on ``epoch``, resource-aware concurrency, the best trial
evaluated and registered as a plain run's model is. One file per job:

    space.py    the workflow's search.space as Tune domains; a trial's config
    plan.py     how many trials at once, CPUs and torch threads each (fails fast when a trial cannot fit)
    pacing.py   ASHA's rungs, trials waiting for each other there, each trial's attempts log
    trial.py    the Tune trainable: train.train_loop for one sample, one epoch per step (imports Ray)
    state.py    a copy of Tune's driver state that a SIGKILL cannot tear (for --resume)
    driver.py   the `search` step: plan, Tuner, trial table, the best trial's best checkpoint
    cli.py      `modelworks tune WORKFLOW` and run_search (the workflow runner with the search step)

Importing this package does not import Ray (the trial and the driver's run do). Private Ray APIs are used
only through modelworks.ray_private.
"""
from modelworks.tune.driver import TRIAL_TABLE_COLUMNS, SearchResult, trial_checkpoints, write_outputs
from modelworks.tune.pacing import asha_rungs, attempts_path, peers_behind, read_attempts, reported_epoch
from modelworks.tune.plan import TrialPlan, plan_trials, trial_memory_bytes
from modelworks.tune.space import max_epochs, possible_values, search_name, trial_config, tune_domain

__all__ = ["TRIAL_TABLE_COLUMNS", "SearchResult", "trial_checkpoints", "write_outputs", "asha_rungs",
           "attempts_path", "peers_behind", "read_attempts", "reported_epoch", "TrialPlan", "plan_trials",
           "trial_memory_bytes", "max_epochs", "possible_values", "search_name", "trial_config", "tune_domain"]
