"""How a process reaches Ray, and where runs live: shared by the workflow runner and the search driver."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from modelworks import ray_private
from modelworks import registry as registry_mod
from modelworks.serve import apply_serve_env


def ensure_ray(num_cpus: int | None = None) -> str:
    """Connect to Ray; returns how, for the console. In order: the cluster RAY_ADDRESS names (``ray job
    submit`` sets it); a cluster already running on this machine (``ray start --head``: a run then starts in
    about a second, not ~5); else a private local one (MODELWORKS_JOIN_RAY=0 always starts a private one).

    address="local" never joins a stale cluster left in /tmp/ray by a killed process (see ray-notes.md).
    """
    if ray.is_initialized():
        return "Ray (connected before)"
    # Train V2's controller picks up each epoch's report on its poll; the 2 s default adds ~2 s per epoch.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not os.environ.get("RAY_ADDRESS"):  # one machine: no spot node to be preempted; one process less to start
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    running = None if os.environ.get("RAY_ADDRESS") or os.environ.get("MODELWORKS_JOIN_RAY") == "0" \
        else ray_private.running_cluster_address()
    # A workflow that deploys its model (`run --serve`) gets Serve's fast ingress (see modelworks/serve).
    apply_serve_env(local=not (os.environ.get("RAY_ADDRESS") or running))
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        how = f"Ray at {os.environ['RAY_ADDRESS']}"
    elif running:  # Train V2 hands RAY_TRAIN_* variables set here on to its controller and workers
        # "auto" reads the same file; an explicit host:port of a local `ray start` is refused on 2.60.
        ray.init(address="auto", logging_level=logging.WARNING)
        how = f"Ray running on this machine ({running})"
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level=logging.WARNING)
        how = "Ray local (started for this run)"
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("MODELWORKS_PROGRESS", "1") == "1"
    return how


def runs_root() -> Path:
    return registry_mod.home() / "runs"
