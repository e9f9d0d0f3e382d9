"""Serve under failure and load: a replica killed mid-load is restored; autoscaling goes up and back down."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from modelworks.config import ServeConfig
from modelworks.registry import Registry
from modelworks.serve.testing import digits_data, free_port, register_digits, running_replicas

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(ray_local, tmp_path_factory):
    from ray import serve

    reg = Registry(str(tmp_path_factory.mktemp("serve_fault") / "registry"))
    register_digits(reg, steps=100)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"url": f"http://127.0.0.1:{port}", "reg": reg}
    serve.shutdown()


class Load:
    """N closed-loop clients posting one digit each; records (time, status)."""

    def __init__(self, url: str, clients: int):
        self.url, self.stop, self.results, self.lock = url, threading.Event(), [], threading.Lock()
        x, _ = digits_data()
        self.body = {"input": x[0].reshape(-1).tolist()}
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self):
        s = requests.Session()
        while not self.stop.is_set():
            try:
                code = s.post(self.url, json=self.body, timeout=30).status_code
            except requests.RequestException:
                code = -1
            with self.lock:
                self.results.append((time.time(), code))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def test_killed_replica_is_restored_and_requests_keep_succeeding(cluster):
    from ray import serve

    from modelworks.serve.app import build

    cfg = ServeConfig(min_replicas=2, max_replicas=2, alias_poll_s=0)
    serve.run(build("digits@1", cluster["reg"].uri, cfg), name="fault", route_prefix="/fault", blocking=False)
    handle = serve.get_app_handle("fault")
    pids = {handle.replica_info.remote().result()["pid"] for _ in range(40)}
    assert len(pids) == 2, pids
    victim = sorted(pids)[0]
    try:
        with Load(cluster["url"] + "/fault/predict", clients=8) as load:
            time.sleep(4)
            t_kill = time.time()
            os.kill(victim, signal.SIGKILL)  # a replica process we started (our own Ray cluster)
            restored_at = None
            deadline = time.time() + 60
            while time.time() < deadline:
                time.sleep(0.5)
                if running_replicas("fault") == 2:
                    now = {handle.replica_info.remote().result()["pid"] for _ in range(20)}
                    if victim not in now and len(now) == 2:
                        restored_at = time.time()
                        break
            time.sleep(3)  # keep the load on the restored pair for a moment
        assert restored_at is not None, "Serve did not restore the killed replica within 60 s"
        window = [code for t, code in load.results if t >= t_kill - 4]
        ok = sum(code == 200 for code in window)
        assert len(window) > 200, len(window)
        assert ok / len(window) >= 0.99, f"{ok}/{len(window)} succeeded ({ {c: window.count(c) for c in set(window)} })"
        print(f"\nreplica kill: {ok}/{len(window)} ok ({ok / len(window):.2%}), restored in {restored_at - t_kill:.1f}s")
    finally:
        serve.delete("fault")


def test_autoscaling_up_under_load_and_back_down(cluster):
    from ray import serve

    from modelworks.serve.app import build

    cfg = ServeConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1,
                      downscale_delay_s=2, max_batch_size=4, batch_wait_timeout_s=0.02, alias_poll_s=0)
    serve.run(build("digits@1", cluster["reg"].uri, cfg), name="scale", route_prefix="/scale", blocking=False)
    try:
        assert running_replicas("scale") == 1
        peak = 1
        with Load(cluster["url"] + "/scale/predict", clients=12) as load:
            deadline = time.time() + 45
            while time.time() < deadline and peak < 2:
                time.sleep(0.5)
                peak = max(peak, running_replicas("scale"))
        assert peak == 2, "replicas did not rise above 1 under sustained load"
        assert all(code == 200 for _, code in load.results)
        deadline = time.time() + 60
        while time.time() < deadline and running_replicas("scale") > 1:
            time.sleep(0.5)
        assert running_replicas("scale") == 1, "replicas did not fall back to 1 after the load"
    finally:
        serve.delete("scale")
