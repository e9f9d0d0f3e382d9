"""A real multi-node Ray cluster on this machine (tests/multinode.py): a head and a worker node as separate
`ray start` processes with 1 CPU each and token auth, and a real S3 server (moto) on 127.0.0.1 holding the
checkpoints and the registry. The workflow goes in through `modelworks submit` with a profile whose storage
is the bucket, as a user with a cluster of machines would send it.

- Two training workers of 1 CPU each must run on different nodes; the model comes back from the bucket.
- A node lost during training (its raylet and workers SIGKILLed): the job still SUCCEEDS once a replacement
  node joins, resuming from the last checkpoint on object storage; no finished epoch is trained twice.
- The object store's secret appears nowhere: not in the job's runtime_env, its logs, Ray's files on any node,
  the run folder, or the bucket.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from modelworks.jobs import Jobs
from modelworks.profiles import load_profile
from modelworks.registry import Registry
from modelworks.serve import free_port
from tests.multinode import LocalCluster, S3Server
from tests.ray_head import VENV_BIN

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PREFIX = "mw"  # the profile's storage: s3://<bucket>/mw


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    s3 = S3Server().start()
    nodes = LocalCluster(s3.env)
    try:
        t0 = time.time()
        nodes.start_head()
        nodes.add_node()
        nodes.wait_for_nodes(2)
        profile = tmp_path_factory.mktemp("profile") / "two-nodes.yaml"
        profile.write_text(yaml.safe_dump({"address": nodes.address, "storage": f"s3://{s3.bucket}/{PREFIX}",
                                           "workers": 2, "cpus_per_worker": 1, "nodes": 2}))
        print(f"\n2-node cluster and S3 server up in {time.time() - t0:.1f} s")
        yield {"s3": s3, "nodes": nodes, "profile": str(profile)}
    finally:
        try:
            nodes.stop()
        finally:
            s3.stop()


@pytest.fixture
def client(cluster, monkeypatch):
    """This process as a user with the cluster's token and the bucket's credentials (to read results back):
    neither may travel in a job."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster["nodes"].token_file))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for k, v in cluster["s3"].env.items():
        monkeypatch.setenv(k, v)
    return Jobs(load_profile(cluster["profile"]))


def submit(cluster, *run_args: str, wait: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "modelworks"), "submit", "workflows/digits.py", "--cluster",
                           cluster["profile"], *([] if wait else ["--no-wait"]), "--", *run_args],
                          env=dict(os.environ), cwd=REPO, capture_output=True, text=True, timeout=600)


def checkpoint_metrics(s3: S3Server, run: str) -> dict[int, dict]:
    """epoch -> metrics.json of each complete checkpoint of the run, read from the bucket."""
    found, keys = {}, set(s3.keys(f"{PREFIX}/runs/{run}"))
    for key in keys:
        m = re.fullmatch(rf"{PREFIX}/runs/{run}/checkpoint_epoch=(\d+)/metrics\.json", key)
        if m and f"{key.rsplit('/', 1)[0]}/sha256sums" in keys:
            found[int(m.group(1))] = json.loads(s3.read(key))
    return found


def accepted_epoch(s3: S3Server, run: str) -> int:
    """The last epoch Ray Train's controller accepted (its checkpoint snapshot on the bucket); 0 before any. A
    checkpoint the worker has uploaded but not yet reported is not finished: the controller never saw it."""
    key = f"{PREFIX}/runs/{run}/checkpoint_manager_snapshot.json"
    if key not in set(s3.keys(f"{PREFIX}/runs/{run}")):
        return 0
    latest = json.loads(s3.read(key)).get("latest_checkpoint_result") or {}
    m = re.fullmatch(r"checkpoint_epoch=(\d+)", latest.get("checkpoint_dir_name") or "")
    return int(m.group(1)) if m else 0


def assert_no_secret(cluster, client: Jobs, job_id: str) -> None:
    secret = cluster["s3"].secret
    info = client.info(job_id)
    assert secret not in json.dumps(info.runtime_env or {}), "the secret travelled in the job's runtime_env"
    assert secret not in client.logs(job_id), "the secret is in the job's log"
    assert secret not in cluster["nodes"].logs_text(), "the secret is in a file under a node's temp dir or run folder"
    for key in cluster["s3"].keys():
        assert secret.encode() not in cluster["s3"].read(key), f"the secret is in s3://{cluster['s3'].bucket}/{key}"


def test_submit_trains_on_two_nodes_and_registers_in_the_bucket(cluster, client):
    t0 = time.time()
    proc = submit(cluster, "--name", "two-nodes", "--set", "train.epochs=3")
    took = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    job_id = proc.stdout.splitlines()[0]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert client.info(job_id).status.value == "SUCCEEDED"
    assert summary["model"] == "digits@1" and summary["run"] == "two-nodes", summary

    # Both ranks' processes, on two different nodes of the cluster (each node has 1 CPU, each worker asks 1).
    ckpts = checkpoint_metrics(cluster["s3"], "two-nodes")
    assert 3 in ckpts and len(ckpts) == 2, sorted(ckpts)  # train.keep_checkpoints=2: Ray Train deleted one
    ranks = ckpts[3]["workers"]["ranks"]
    assert ckpts[3]["workers"]["world_size"] == 2 and len({r["node_id"] for r in ranks}) == 2, ranks
    assert {r["node_id"] for r in ranks} == {n["node_id"] for n in cluster["nodes"].alive_nodes()}

    # The registered model, read back from the bucket through the one loader (checksums verified).
    registry = Registry(f"s3://{cluster['s3'].bucket}/{PREFIX}/registry")
    assert registry.versions("digits") == [1]
    loaded, version = registry.load("digits@1")
    assert version == 1 and loaded.metrics["epoch"] == 3
    assert loaded.metrics["val_accuracy"] == pytest.approx(summary["val_accuracy"])
    assert registry.info("digits", 1)["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert summary["test_accuracy"] > 0.8, summary  # 3 epochs of digits on 2 workers: a model, not noise
    assert_no_secret(cluster, client, job_id)
    print(f"submit digits, 2 workers on 2 nodes, S3 storage (3 epochs): {took:.1f} s")


def test_a_lost_node_costs_no_finished_epoch(cluster, client):
    """SIGKILL the worker node (raylet and workers) once Ray Train has accepted epoch 1's checkpoint; start a
    replacement node; the job resumes from the last accepted checkpoint on object storage and succeeds."""
    nodes, s3 = cluster["nodes"], cluster["s3"]
    epochs = 100  # short epochs (the controller polls every 0.05 s): the kill must land while training goes on
    proc = submit(cluster, "--name", "lose-a-node", "--set", f"train.epochs={epochs}", "--set",
                  "train.max_failures=1", wait=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.split()[0]
    deadline = time.time() + 300
    while not accepted_epoch(s3, "lose-a-node"):
        assert client.info(job_id).status.value in ("PENDING", "RUNNING"), client.logs(job_id)[-3000:]
        assert time.time() < deadline, client.logs(job_id)[-3000:]
        time.sleep(0.2)
    before = {n["node_id"] for n in nodes.alive_nodes()}
    t_kill = time.time()
    victim = nodes.worker_nodes()[0]
    assert nodes.kill_node(victim) > 0
    # Finished = accepted by the controller (on the head, which lives on): a checkpoint uploaded in the instant
    # before the kill but never reported is not, and the rerun of its epoch is not a lost one.
    done_at_kill = accepted_epoch(s3, "lose-a-node")
    at_kill = checkpoint_metrics(s3, "lose-a-node")
    nodes.add_node()  # the replacement
    while client.info(job_id).status.value in ("PENDING", "RUNNING"):
        assert time.time() < deadline + 300, client.logs(job_id)[-3000:]
        time.sleep(1)
    took = time.time() - t_kill
    log = client.logs(job_id)
    assert client.info(job_id).status.value == "SUCCEEDED", log[-4000:]

    # The run's history: every epoch's line exactly once, and the restart named the checkpoint it came from.
    trained = [int(m) for m in re.findall(rf"^\s*epoch (\d+)/{epochs} ", log, re.M)]
    ray_log = nodes.home / "runs" / "lose-a-node" / "logs" / "ray.log"
    assert trained == list(range(1, epochs + 1)), (trained, log[-3000:], ray_log.read_text()[-6000:])
    resumed = re.findall(r"training resumed from checkpoint_epoch=(\d+) \(attempt 2 of 2\)", log)
    assert len(resumed) == 1, log[-4000:]
    resumed_from = int(resumed[0])
    assert done_at_kill <= resumed_from < epochs, (done_at_kill, resumed_from)
    ckpts = checkpoint_metrics(s3, "lose-a-node")
    assert epochs in ckpts
    # Epochs up to the checkpoint ran on the first worker node, the rest on its replacement.
    first, last = ({r["node_id"] for r in c["workers"]["ranks"]} for c in (at_kill[done_at_kill], ckpts[epochs]))
    after = {n["node_id"] for n in nodes.alive_nodes()}
    assert first == before and last == after and first != last, (before, after, first, last)
    assert [h["epoch"] for h in ckpts[epochs]["history"]] == list(range(1, epochs + 1))
    assert_no_secret(cluster, client, job_id)
    print(f"node lost after checkpoint_epoch={done_at_kill}; resumed from checkpoint_epoch={resumed_from}; "
          f"job SUCCEEDED {took:.1f} s after the kill")


def test_serve_on_two_nodes_survives_losing_one(cluster, client):
    """2 replicas (1 CPU each) on the 2 nodes, the model read from the bucket, one HTTP entry point on the head;
    under load, the worker node is SIGKILLed: >= 99 % of requests still succeed, and the lost replica comes
    back on the node that replaces it."""
    from tests.test_serve_fault import Load

    nodes, s3 = cluster["nodes"], cluster["s3"]
    registry = f"s3://{s3.bucket}/{PREFIX}/registry"
    if not Registry(registry).versions("digits"):  # this test alone: make the model first
        assert submit(cluster, "--name", "for-serve", "--set", "train.epochs=2").returncode == 0
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{nodes.gcs_port}"}
    started = subprocess.run([str(VENV_BIN / "modelworks"), "serve", "digits@1", "--registry", registry,
                              "--replicas", "2:2", "--set", "replica_cpus=1", "--set", "proxy_location=HeadOnly",
                              "--port", str(port), "--detach"], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]

    def wait_for_two_replicas_on_two_nodes(timeout: float) -> set[str]:
        deadline = time.time() + timeout
        while True:
            running = {node for state, node in nodes.serve_replicas() if state == "RUNNING"}
            if len(running) == 2:
                return running
            assert time.time() < deadline, nodes.serve_replicas()
            time.sleep(0.5)

    before = wait_for_two_replicas_on_two_nodes(120)
    victim = nodes.worker_nodes()[0]
    url = f"http://127.0.0.1:{port}/predict"
    with Load(url, clients=8) as load:
        time.sleep(3)
        t_kill = time.time()
        nodes.kill_node(victim)
        time.sleep(10)  # the replica is gone; the head's replica answers alone
    codes = [code for _, code in load.results]
    ok = sum(code == 200 for code in codes)
    assert len(codes) > 200, len(codes)
    assert ok / len(codes) >= 0.99, (ok, len(codes), sorted(set(codes)))
    # A node returns (started without the load: a raylet must register within Ray's fixed 30 s).
    nodes.add_node()
    after = wait_for_two_replicas_on_two_nodes(180)
    back = time.time() - t_kill
    assert len(before & after) == 1, (before, after)  # the head's replica stayed; the other is on the new node
    with Load(url, clients=8) as again:
        time.sleep(3)
    assert again.results and all(code == 200 for _, code in again.results), sorted({c for _, c in again.results})
    print(f"serve on 2 nodes, node lost under load (8 clients): {ok}/{len(codes)} = {ok / len(codes):.2%} "
          f"succeeded; 2 replicas running again {back:.1f} s after the kill (the node restarted after 10 s)")
