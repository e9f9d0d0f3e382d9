"""A real Ray cluster for the tests of cluster/ and the job commands: ``ray start --head`` with token auth, on
free ports, under its own short temp dir (session-scoped, registered in conftest.py: one cluster for
test_cluster.py and test_jobs.py). Only the processes under that temp dir are stopped at the end, never with
`ray stop` (other Ray clusters share the host)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from modelworks.serve import free_port

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def _pids_of(marker: str) -> set[int]:
    """Processes whose command line mentions marker (our own --temp-dir), plus all their descendants."""
    parents, mine = {}, set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents[int(d.name)] = ppid
        if marker in cmd:
            mine.add(int(d.name))
    grew = True
    while grew:
        kids = {p for p, pp in parents.items() if pp in mine and p not in mine}
        mine |= kids
        grew = bool(kids)
    mine.discard(os.getpid())
    return mine


def stop_own_cluster(marker: str, timeout: float = 10.0) -> set[int]:
    """SIGTERM, then SIGKILL, only the processes of the cluster under our temp dir. Returns survivors."""
    pids = _pids_of(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists()
                    and (Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")}
            if not pids:
                return set()
            time.sleep(0.2)
    return pids


def http(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="session")
def ray_head():
    """A 1-node `ray start --head` cluster with token auth, on free ports, under its own short temp dir."""
    base = Path(tempfile.mkdtemp(prefix="mwc-", dir="/tmp"))  # short: Ray's unix socket paths are length-capped
    marker = str(base / "ray")
    home = base / "home"
    (home).mkdir()
    gen = subprocess.run([RAY, "get-auth-token", "--generate"], env={**os.environ, "HOME": str(home)},
                         capture_output=True, text=True, timeout=60)
    token_file = home / ".ray" / "auth_token"
    assert gen.returncode == 0 and token_file.is_file(), gen.stderr[-2000:]
    token = token_file.read_text().strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    # Jobs inherit the cluster's environment: its own MODELWORKS_HOME, not that of the test that came first.
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_file), MODELWORKS_HOME=str(base / "mwhome"))
    ports = {"gcs": free_port(), "dashboard": free_port(), "client": free_port(), "agent": free_port()}
    cmd = [RAY, "start", "--head", "--num-cpus=2", f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
           f"--dashboard-agent-listen-port={ports['agent']}", "--min-worker-port=0", "--max-worker-port=0",
           "--disable-usage-stats", f"--temp-dir={marker}", "--include-dashboard=true"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                                 start_new_session=True, cwd=base)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        address = f"http://127.0.0.1:{ports['dashboard']}"
        deadline = time.time() + 60
        while http(f"{address}/api/version", token)[0] != 200:
            assert time.time() < deadline, "dashboard did not come up"
            time.sleep(0.5)
        yield {"address": address, "token": token, "token_file": token_file, "env": env, "base": base}
    finally:
        survivors = stop_own_cluster(marker)
        assert not survivors, f"could not stop our Ray processes {survivors}"
        shutil.rmtree(base, ignore_errors=True)
