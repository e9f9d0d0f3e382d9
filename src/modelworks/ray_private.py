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
- ``abortable_torch_trainer``: overrides ``TorchTrainer._initialize_and_run_controller`` (from
  ``ray.train.v2.api.data_parallel_trainer``, with its ``TrainController``, ``get_env_vars_to_propagate`` and
  ``ray._raylet.RAY_NODE_ID_KEY``) to hand the controller actor to its owner, so a Tune trial can abort its
  nested Train run. Ray 2.60. Pinned by tests/test_tune.py (the 2-worker search).
- ``tune_driver_staging_path`` and ``TUNE_STATE_FILE``: a Tune trial's ``storage.experiment_driver_staging_path``
  (where the driver saves its experiment state before copying it to storage) and the names of those state
  files (``<kind>-<session start>.json|pkl``). Ray 2.60. Pinned by tests/test_tune_resume.py and
  tests/test_tune_state.py.
"""
from __future__ import annotations

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
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
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


def abortable_torch_trainer(owner):
    """A TorchTrainer class that sets ``owner.controller`` to its controller actor (Train only keeps it on the
    main thread, for its SIGINT handler), so ``ray.get(owner.controller.abort.remote())`` ends the run."""
    import ray
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api import data_parallel_trainer as dpt

    class _AbortableTorchTrainer(TorchTrainer):
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
