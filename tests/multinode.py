"""A real multi-node Ray cluster on this machine and a real S3-compatible object store, for tests/test_multinode.py.

- ``S3Server``: moto in server mode (``moto_server``, an S3 API over HTTP) on 127.0.0.1 and a free port, with one
  bucket. Clients reach it as they would AWS: AWS_ENDPOINT_URL plus key id and secret in their environment.
- ``LocalCluster``: ``ray start --head`` and ``ray start --address`` worker nodes, each a separate set of
  processes with its own ``--temp-dir`` and ``--num-cpus``, token auth on, every node started with the object
  store's credentials in its environment (where a real cluster's nodes get them: an instance role or a
  secret mounted into the pod), so they never travel in a job. ``kill_node`` SIGKILLs one node's raylet and
  everything it started, as a lost machine would. ``stop`` stops only processes under the cluster's folder,
  never with `ray stop` (other clusters share the host).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from modelworks.serve import free_port
from tests.ray_head import RAY, VENV_BIN, _pids_of, http, stop_own_cluster


class S3Server:
    def __init__(self, bucket: str = "modelworks-ci"):
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.key_id = "AKIA" + secrets.token_hex(8).upper()
        self.secret = "mw-secret-" + secrets.token_hex(16)  # the tests grep logs and files for this string
        self.log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])
        self.proc = None

    @property
    def env(self) -> dict[str, str]:
        """What a node (or a client) needs in its environment to use the bucket, as with AWS itself."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(access_key=self.key_id, secret_key=self.secret, endpoint_override=self.endpoint,
                                 region="us-east-1", allow_bucket_creation=True)

    def start(self) -> "S3Server":
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                self.filesystem().create_dir(self.bucket)
                return self
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-2000:]
                assert time.time() < deadline, "moto_server did not come up: " + self.log.read_text()[-2000:]
                time.sleep(0.3)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under prefix."""
        infos = self.filesystem().get_file_info(pafs.FileSelector(f"{self.bucket}/{prefix}".rstrip("/"),
                                                                  recursive=True, allow_not_found=True))
        return sorted(i.path.removeprefix(f"{self.bucket}/") for i in infos if i.type == pafs.FileType.File)

    def read(self, key: str) -> bytes:
        with self.filesystem().open_input_stream(f"{self.bucket}/{key}") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.unlink(missing_ok=True)


class LocalCluster:
    def __init__(self, node_env: dict[str, str]):
        self.base = Path(tempfile.mkdtemp(prefix="mwn-", dir="/tmp"))  # short: Ray's socket paths are capped
        home = self.base / "home"
        home.mkdir()
        gen = subprocess.run([RAY, "get-auth-token", "--generate"], env={**os.environ, "HOME": str(home)},
                             capture_output=True, text=True, timeout=60)
        self.token_file = home / ".ray" / "auth_token"
        assert gen.returncode == 0 and self.token_file.is_file(), gen.stderr[-2000:]
        self.token = self.token_file.read_text().strip()
        self.home = self.base / "mwhome"  # the head's MODELWORKS_HOME: the driver's run folders
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "AWS_", "MODELWORKS_"))}
        env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(self.token_file), MODELWORKS_HOME=str(self.home),
                   **node_env)
        self.env = env
        self.gcs_port = self.dashboard_port = None
        self.nodes: dict[str, Path] = {}  # name -> its temp dir, for the nodes alive
        self.workers_started = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        temp = self.base / name
        cmd = [RAY, "start", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
               "--node-manager-port=0", "--object-manager-port=0", "--min-worker-port=0", "--max-worker-port=0",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               "--disable-usage-stats", *args]
        started = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180,
                                 start_new_session=True, cwd=self.base)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        self.nodes[name] = temp

    def start_head(self) -> None:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                             "--include-dashboard=true"])
        deadline = time.time() + 90
        while http(f"{self.address}/api/version", self.token)[0] != 200:
            assert time.time() < deadline, "dashboard did not come up"
            time.sleep(0.5)

    def add_node(self) -> str:
        """Start a worker node; returns its name (w1, w2, ...: short, Ray's socket paths under it are capped)."""
        self.workers_started += 1
        name = f"w{self.workers_started}"
        self._start(name, [f"--address=127.0.0.1:{self.gcs_port}"])
        return name

    def alive_nodes(self) -> list[dict]:
        status, body = http(f"{self.address}/api/v0/nodes?limit=100", self.token)
        assert status == 200, body[:500]
        return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.time() + timeout
        while len(nodes := self.alive_nodes()) != count:
            assert time.time() < deadline, f"{len(nodes)} alive nodes, expected {count}"
            time.sleep(0.5)
        return nodes

    def worker_nodes(self) -> list[str]:
        return [name for name in self.nodes if name != "head"]

    def kill_node(self, name: str) -> int:
        """SIGKILL the node's raylet and every process it started (workers, agents): a machine lost at once."""
        pids = _pids_of(str(self.nodes.pop(name)))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def serve_replicas(self) -> list[tuple[str, str]]:
        """(state, node id or None before it is placed) of every Serve replica, from the dashboard's REST API."""
        status, body = http(f"{self.address}/api/serve/applications/", self.token)
        assert status == 200, body[:500]
        return [(r["state"], r.get("node_id")) for app in json.loads(body).get("applications", {}).values()
                for d in app["deployments"].values() for r in d["replicas"]]

    def logs_text(self) -> str:
        """Every file Ray wrote under the nodes' temp dirs (logs, runtime_env packages), as text."""
        parts = []
        for path in self.base.rglob("*"):
            if path.is_file() and not path.is_socket() and path.stat().st_size < 50_000_000:
                try:
                    parts.append(path.read_bytes().decode(errors="replace"))
                except OSError:
                    pass
        return "\n".join(parts)

    def stop(self) -> None:
        survivors = stop_own_cluster(str(self.base))
        shutil.rmtree(self.base, ignore_errors=True)
        assert not survivors, f"could not stop our Ray processes {survivors}"
