"""Every use of a Ray internal (a private module or a file format Ray does not document) lives here, so a
Ray upgrade has one place to check. Each entry: what it is, the Ray version it mirrors, the test pinning it.

- ``running_cluster_address``: reads ``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``, the file
  ``ray start --head`` writes with the GCS address (one line, ``host:port``); ``ray.init(address="auto")``
  reads the same file. Ray 2.60. Pinned by tests/test_console.py::test_a_run_joins_a_running_ray.

(tune.py still imports ``ray.train.v2._internal.execution.train_fn_utils``; issue 9 moves it here.)
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


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
