"""What a local `modelworks serve --host 127.0.0.1` listens on, and who can talk to it (no mocks).

The serve runs as a user runs it, in its own process with its own private Ray (every Ray process of it is a
descendant of the CLI process: ray.init(address="local") starts them, so other Rays on the machine are not
counted). Every TCP listening socket of that process tree must be on loopback, or be a Ray port that refuses a
caller without the cluster token; the refusal is shown over loopback, next to the same call with the token.

The one listener Ray does not let us bind to loopback (Ray 2.60): each Serve replica's inter-deployment gRPC
server (``ray.serve._private.replica``, ``[::]:0``, hard-coded). It runs Ray's token interceptor.
"""
from __future__ import annotations

import ipaddress
import stat
import time

import grpc
import psutil
import pytest
import requests

from modelworks.registry import Registry
from modelworks.serve.testing import free_port, register_digits

GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo"       # any GCS call: the token is checked first
REPLICA_METHOD = "/ray.serve.ASGIService/HandleRequest"           # the replica's inter-deployment service


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped:  # [::ffff:127.0.0.1]: a dual-stack socket bound to 127.0.0.1
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listening_sockets(root_pid: int) -> list[dict]:
    """Every TCP socket in LISTEN state held by ``root_pid`` or any of its descendants."""
    root = psutil.Process(root_pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        found += [{"pid": proc.pid, "process": name, "ip": c.laddr.ip, "port": c.laddr.port}
                  for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def settled_listening_sockets(root_pid: int, quiet_s: float = 8.0, timeout_s: float = 90.0) -> list[dict]:
    """All sockets seen listening in the tree until the set has not grown for ``quiet_s``: Ray's agents,
    dashboard and autoscaler monitor open theirs a while after the app is up (later on a loaded machine)."""
    seen: dict[tuple, dict] = {}
    last_growth = start = time.time()
    while time.time() - last_growth < quiet_s and time.time() - start < timeout_s:
        for s in listening_sockets(root_pid):
            if (s["ip"], s["port"]) not in seen:
                seen[(s["ip"], s["port"])] = s
                last_growth = time.time()
        time.sleep(1)
    return list(seen.values())


def grpc_call(port: int, method: str, token: str | None = None) -> grpc.StatusCode:
    """The status of one raw gRPC call (an empty request) to 127.0.0.1:port, with or without the token."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary(method)(b"", timeout=15, metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


@pytest.mark.ray
@pytest.mark.slow
def test_serve_listens_on_loopback_and_ray_refuses_callers_without_the_token(tmp_path, monkeypatch):
    from tests.cli_process import CliProcess

    home = tmp_path / "mw"
    reg = Registry(str(home / "registry"))
    register_digits(reg, steps=50)
    port = free_port()
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    # HOME: a fresh ~/.ray, so the serve makes its own token; RAY_AUTH_MODE=disabled: overridden for a Ray
    # modelworks starts.
    env = {"MODELWORKS_HOME": str(home), "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    with CliProcess("serve", "digits", "--registry", reg.uri, "--host", "127.0.0.1", "--port", str(port),
                    env=env) as cli:
        try:
            cli.wait_for_line(f"serving digits (version 1) at http://127.0.0.1:{port}", timeout=300)
            assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
            sockets = settled_listening_sockets(cli.proc.pid)
            table = "\n".join(f"  {s['process']:<28} pid {s['pid']:<7} {s['ip']}:{s['port']}" for s in sockets)
            print(f"listening sockets of `modelworks serve` (pid {cli.proc.pid}):\n{table}")
            processes = {s["process"] for s in sockets}
            assert {"gcs_server", "raylet", "haproxy"} <= processes, table  # the whole tree, not just the CLI
            assert any(s["port"] == port and s["process"] == "haproxy" for s in sockets), table

            token_file = tmp_path / ".ray" / "auth_token"
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600, oct(token_file.stat().st_mode)
            token = token_file.read_text().strip()

            # Ray's own ports are on loopback, and still refuse a caller without the token: the GCS.
            (gcs,) = [s for s in sockets if s["process"] == "gcs_server"]
            assert is_loopback(gcs["ip"]), table
            assert grpc_call(gcs["port"], GCS_METHOD) == grpc.StatusCode.UNAUTHENTICATED
            assert grpc_call(gcs["port"], GCS_METHOD, token="0" * 64) == grpc.StatusCode.UNAUTHENTICATED
            assert grpc_call(gcs["port"], GCS_METHOD, token=token) == grpc.StatusCode.OK

            # Beyond loopback: only Serve replicas' inter-deployment gRPC servers, each refusing a caller
            # without the token (and answering past the token check with it).
            exposed = [s for s in sockets if not is_loopback(s["ip"])]
            assert all(s["process"].startswith("ray::ServeRepl") for s in exposed), table
            for s in exposed:
                assert grpc_call(s["port"], REPLICA_METHOD) == grpc.StatusCode.UNAUTHENTICATED, s
                assert grpc_call(s["port"], REPLICA_METHOD, token=token) != grpc.StatusCode.UNAUTHENTICATED, s
        finally:
            assert cli.terminate() == 0, cli.output[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_haproxy_side_listeners_follow_the_http_host():
    """The rewrite the HAProxy wrapper does (ray_private.bind_haproxy_side_listeners), and that Ray's template
    still has the lines it rewrites (if Ray changes them, the rewrite would silently do nothing)."""
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    from modelworks.ray_private import bind_haproxy_side_listeners

    assert "frontend prometheus\n    bind :{{ config.metrics_port }}\n" in HAPROXY_CONFIG_TEMPLATE
    assert "listen stats\n  bind *:{{ config.stats_port }}\n" in HAPROXY_CONFIG_TEMPLATE
    assert "frontend http_frontend\n    bind {{ config.frontend_host }}:{{ config.frontend_port }}\n" \
        in HAPROXY_CONFIG_TEMPLATE
    assert "stats socket {{ config.socket_path }} mode 666 level admin" in HAPROXY_CONFIG_TEMPLATE

    config = ("global\n    stats socket /tmp/h/admin.sock mode 666 level admin expose-fd listeners\n"
              "frontend prometheus\n    bind :9101\n    mode http\n"
              "frontend http_frontend\n    bind 127.0.0.1:8000\n"
              "backend b\n    server s 127.0.0.1:30000 check\n"
              "listen stats\n  bind *:8404\n  stats enable\n")
    fixed = bind_haproxy_side_listeners(config)
    assert fixed == (config.replace("bind :9101", "bind 127.0.0.1:9101").replace("bind *:8404", "bind 127.0.0.1:8404")
                     .replace("mode 666", "mode 600"))
    assert bind_haproxy_side_listeners(fixed) == fixed
    # Served on every interface (--host 0.0.0.0 renders as *): the side listeners stay where Ray put them.
    everywhere = config.replace("bind 127.0.0.1:8000", "bind *:8000")
    assert bind_haproxy_side_listeners(everywhere) == everywhere.replace("mode 666", "mode 600")
