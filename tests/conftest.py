"""Shared fixtures. Integration tests start a real local Ray (never a mock); data tests read real files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ray_head import ray_head  # noqa: F401 - one `ray start --head` cluster for the session

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def modelworks_home(tmp_path, monkeypatch):
    """Every test gets its own registry, runs folder and step cache. MLflow tracking (on by default for users)
    is off unless a test turns it on: creating a fresh MLflow store costs seconds per test home, and the
    tests of tracking itself (test_tracking.py, test_pipeline.py) set MODELWORKS_TRACKING=1."""
    home = tmp_path / "mwhome"
    monkeypatch.setenv("MODELWORKS_HOME", str(home))
    monkeypatch.delenv("MODELWORKS_REGISTRY", raising=False)
    monkeypatch.setenv("MODELWORKS_TRACKING", "0")
    return home


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the session (address="local": never joins a stale cluster)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ["MODELWORKS_PROGRESS"] = "0"
    from modelworks.serve import apply_serve_env

    apply_serve_env(local=True)  # the serve tests run against the ingress `modelworks serve` uses
    if not ray.is_initialized():
        # num_gpus=0: the same 2-CPU, no-GPU cluster on every machine; the GPU fail-fast test relies on it.
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def require_folder(folder: Path | None, reason: str) -> Path:
    """``folder`` if it is a directory; else skip locally, and fail under CI (a CI run must not pass by
    skipping what it was meant to check)."""
    if folder is None or not folder.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " - required under CI")
        pytest.skip(reason)
    return folder


def require_dataset(name: str) -> Path:
    """The dataset folder under MODELWORKS_DATA_DIR; skip locally when absent, fail under CI."""
    root = os.environ.get("MODELWORKS_DATA_DIR")
    return require_folder(Path(root) / name if root else None,
                          f"dataset '{name}' not found (MODELWORKS_DATA_DIR={root!r}); "
                          f"point MODELWORKS_DATA_DIR at a folder holding {name}/")


def serve_fresh_registry(tmp_path_factory, label: str, register, model: str, cfg) -> tuple:
    """`modelworks serve`'s runner serving ``model`` on a free port from a registry in a fresh MODELWORKS_HOME
    (``label``: its folder's name) that ``register(registry)`` fills: (registry, home, url). The module's
    fixture calls ``ray.serve.shutdown()`` when it is done."""
    from modelworks.registry import Registry
    from modelworks.serve import free_port, runner

    home = tmp_path_factory.mktemp(label)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELWORKS_HOME", str(home))
        reg = Registry(str(home / "registry"))
        register(reg)
        port = free_port()
        runner.start(model, registry=reg.uri, serve_config=cfg, port=port)
    return reg, home, f"http://127.0.0.1:{port}"


@pytest.fixture
def mnist_dir() -> Path:
    return require_dataset("mnist")


def assert_two_ranks(workers: dict) -> None:
    """A checkpoint's ``workers`` record shows a 2-rank DDP group: world size 2, ranks 0 and 1 in two distinct
    worker processes (not the test's). A run that trained on one worker records world size 1 and one rank."""
    ranks = workers["ranks"]
    assert workers["world_size"] == 2, workers
    assert [r["rank"] for r in ranks] == [0, 1], workers
    pids = {(r["node_id"], r["pid"]) for r in ranks}
    assert len(pids) == 2 and os.getpid() not in {r["pid"] for r in ranks}, workers
