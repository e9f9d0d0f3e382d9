"""How a process reaches Ray, and where runs live: shared by the workflow runner and the search driver."""
from __future__ import annotations

import logging
import os
import secrets
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ray

from modelworks import ray_private
from modelworks import registry as registry_mod
from modelworks.serve import apply_serve_env


# How often Train V2's controller polls its workers. A worker's ``ray.train.report`` waits until the controller has
# picked up its previous report (a queue of one), so an epoch costs at least one poll: Ray's 2 s default adds ~2 s
# to every epoch. A setting in the environment before this module is imported is the user's and always wins.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_DEFAULT_S = "0.2"
_TRAIN_POLL_FROM_USER = TRAIN_POLL_ENV in os.environ


@contextmanager
def train_poll_interval(seconds: float | None):
    """The controller poll for the TorchTrainer started inside (Train V2 passes RAY_TRAIN_* variables of the
    driver on to its controller): ``seconds`` unless the user chose one; None keeps the process default."""
    if seconds is None or _TRAIN_POLL_FROM_USER:
        yield
        return
    before = os.environ.get(TRAIN_POLL_ENV)
    os.environ[TRAIN_POLL_ENV] = str(seconds)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRAIN_POLL_ENV, None)
        else:
            os.environ[TRAIN_POLL_ENV] = before


def ensure_ray(num_cpus: int | None = None) -> str:
    """Connect to Ray; returns how, for the console. In order: the cluster RAY_ADDRESS names (``ray job
    submit`` sets it); a cluster already running on this machine (``ray start --head``: a run then starts in
    about a second, not ~5); else a private local one (MODELWORKS_JOIN_RAY=0 always starts a private one).

    address="local" never joins a stale cluster left in /tmp/ray by a killed process (see ray-notes.md).
    """
    if ray.is_initialized():
        return "Ray (connected before)"
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_DEFAULT_S)  # a private Ray's processes inherit it (Tune's trials)
    ray_private.print_once_from_train_workers()
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
        init_private_ray(num_cpus=num_cpus or os.cpu_count(), logging_level=logging.WARNING)
        how = "Ray local (started for this run)"
    if not os.environ.get("RAY_ADDRESS"):  # this machine: Train's controller will want it, start it now
        ray_private.start_train_autoscaling_coordinator()
    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("MODELWORKS_PROGRESS", "1") == "1"
    return how


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are up now."""
    return len([n for n in ray.nodes() if n.get("Alive")])


def ray_is_local() -> bool:
    """One node: every process of the run shares this machine's disk and cores."""
    return alive_nodes() <= 1


def init_private_ray(**kwargs) -> None:
    """Start a Ray for this process alone (``address="local"``: never joins a stale cluster) that nothing
    beyond loopback can reach, and that refuses a caller without the cluster token on loopback too:

    - its node IP is 127.0.0.1, so the GCS, raylet, worker, dashboard-agent and runtime-env-agent servers bind
      127.0.0.1 (otherwise all interfaces), see ray_private.init_loopback_ray;
    - Serve's HAProxy side listeners (stats, Prometheus) bind the HTTP host, not all interfaces, and its admin
      socket is mode 600, see ray_private.use_haproxy_wrapper;
    - token auth is on (``use_token_auth``), and no dashboard.
    ``kwargs`` go to ray.init."""
    apply_serve_env(local=True)
    use_token_auth()
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        ray_private.use_haproxy_wrapper(registry_mod.home() / "bin")
    ray_private.init_loopback_ray(**{"include_dashboard": False, **kwargs})


def ray_token_file() -> Path:
    """The token file Ray and its CLI read when RAY_AUTH_TOKEN is unset: RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def use_token_auth() -> None:
    """Token auth on for the Ray about to start in this process (its daemons inherit the environment):
    RAY_AUTH_MODE=token, even where it said "disabled" (Ray 2.60 turns it on for a local ray.init() by default,
    and warns on the console when it does). The token is the one Ray and its CLI look for: RAY_AUTH_TOKEN,
    the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token, which is created here when missing (Ray would
    create it readable by everyone) and narrowed to mode 600 when others can read it: on one machine the
    token is all that stands between another local user and Ray's loopback ports."""
    ray_private.enable_token_auth()
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = ray_token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_file():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auth_token-")  # mode 600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits, hex
        os.link(tmp, path)  # never replaces a token another process wrote meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def runs_root() -> Path:
    return registry_mod.home() / "runs"
