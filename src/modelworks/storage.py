"""Where a run's checkpoints are kept: in its run folder on this machine, or on object storage every node sees.

``MODELWORKS_STORAGE`` (a cluster profile's ``storage: s3://bucket/prefix``; any pyarrow filesystem URI) makes
object storage the home of a run's checkpoints. Layout under it::

    <uri>/runs/<run>/checkpoint_epoch=N/...          Ray Train writes each checkpoint there from the worker
    <uri>/runs/<run>/checkpoint_manager_snapshot.json   that made it, and a restarted run resumes from there
    <uri>/runs/<run>/pretrain/...                    (the same below, for a text workflow's steps)
    <uri>/registry/...                               the model registry (registry.py, MODELWORKS_REGISTRY)

The driver keeps a copy of a run's checkpoints in its run folder (``pull``), refreshed before it decides
where to resume and after each training run; evaluate and register read that copy. A driver on a fresh
machine (a new head node) therefore resumes from what object storage holds, not from its own disk.

Credentials are never part of the URI, a profile or a job's runtime_env: each node's environment provides
them, as pyarrow reads them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance role; AWS_ENDPOINT_URL
for an S3-compatible server such as MinIO).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from modelworks import checkpoint
from modelworks.runtime import runs_root

ENV = "MODELWORKS_STORAGE"
# What a run folder holds of Ray Train's: its checkpoints and the snapshot that says which is the latest.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def remote_root() -> str | None:
    """The object-storage URI runs are kept under, or None (runs stay in this machine's run folders)."""
    uri = os.environ.get(ENV, "").strip()
    return uri.rstrip("/") or None


def _remote_dir(local_dir: Path) -> str | None:
    """The object-storage twin of a folder under the local runs folder (None without object storage)."""
    root = remote_root()
    if root is None:
        return None
    relative = Path(local_dir).resolve().relative_to(runs_root().resolve())
    return f"{root}/runs/{relative.as_posix()}" if str(relative) != "." else f"{root}/runs"


def train_storage(local_storage: Path) -> str:
    """The ``storage_path`` Ray Train writes a run's checkpoints to: the object-storage twin of
    ``local_storage`` (a folder under the runs folder), or that folder itself."""
    return _remote_dir(local_storage) or str(local_storage)


def pull(run_dir: Path) -> int:
    """Bring the local copy of a run's checkpoints level with object storage: copy the complete checkpoints
    it lacks, drop those Ray Train deleted there (``train.keep_checkpoints``), refresh the snapshot. Returns
    how many checkpoints were copied; a no-op without object storage."""
    remote = _remote_dir(run_dir)
    if remote is None:
        return 0
    fs, base = pafs.FileSystem.from_uri(remote)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    entries = fs.get_file_info(pafs.FileSelector(base))
    there = {e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")}
    copied = 0
    for name in sorted(there):
        if (run_dir / name / checkpoint.SUMS).is_file():
            continue
        if fs.get_file_info(f"{base}/{name}/{checkpoint.SUMS}").type == pafs.FileType.NotFound:
            continue  # an upload cut off by a failure: Ray Train's snapshot never names it
        checkpoint.fetch(fs, f"{base}/{name}", run_dir / name)
        copied += 1
    for stale in run_dir.glob("checkpoint_*"):
        if stale.is_dir() and stale.name not in there:
            shutil.rmtree(stale)
    if SNAPSHOT in {e.base_name for e in entries}:
        with fs.open_input_stream(f"{base}/{SNAPSHOT}") as f:
            (run_dir / SNAPSHOT).write_bytes(f.read())
    return copied
