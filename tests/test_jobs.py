"""Cluster profiles (modelworks/profiles.py), `modelworks submit` and `modelworks jobs` (modelworks/jobs.py).

Offline: every profile in cluster/profiles validates, a broken one fails with one line naming the problem, a
profile becomes the environment and --set items a run gets (the command line's own --set wins), and a job's
runtime_env never carries this machine's credentials.
Real (the session's `ray start --head` with token auth, tests/ray_head.py): `modelworks submit` of
workflows/digits.py end to end, with `modelworks jobs status|list|logs` on the job; `jobs stop` of a running
job; a caller without the token gets one line, not a traceback.
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

from modelworks.cli import main
from modelworks.config import apply_overrides, load_workflow
from modelworks.errors import UserError
from modelworks.jobs import Jobs, entrypoint, failure_cause
from modelworks.profiles import PROFILES_DIR, Profile, apply_to_run, load_profile
from tests.ray_head import VENV_BIN

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "workflows" / "digits.py"


def write_profile(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


# ------------------------------------------------------------------------------------------------ profiles
@pytest.mark.parametrize("path", sorted((REPO / PROFILES_DIR).glob("*.yaml")), ids=lambda p: p.stem)
def test_every_profile_in_cluster_profiles_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # profiles and their runtime_env files are named from the checkout's root
    profile = load_profile(path.stem)
    assert profile.name == path.stem
    env = profile.job_runtime_env()
    assert Path(env["working_dir"]) == REPO and "/.venv" in env["excludes"]
    assert not [k for k in env["env_vars"] if "SECRET" in k or "TOKEN" in k]


def test_the_profiles_say_what_the_readme_says(monkeypatch):
    monkeypatch.chdir(REPO)
    assert {"local", "kuberay"} <= {p.stem for p in PROFILES_DIR.glob("*.yaml")}
    kuberay = load_profile("kuberay")
    assert kuberay.job_address() == "http://127.0.0.1:8265" and kuberay.nodes > 1
    assert kuberay.storage_env()["MODELWORKS_REGISTRY"].startswith("s3://")
    assert load_profile("local") == Profile()  # the file only spells out the defaults
    monkeypatch.chdir(REPO.parent)  # no cluster/profiles here: `local` still works
    assert load_profile(None) == Profile()


@pytest.mark.parametrize("fields,expected", [
    ({"adress": "http://h:8265"}, r"unknown key 'adress' \(known: address, storage"),
    ({"workers": 0}, r"workers: Input should be greater than or equal to 1 \(got 0\)"),
    ({"gpus_per_worker": 2}, r"gpus_per_worker: Input should be 0 or 1"),
    ({"storage": "/tmp/mw", "nodes": 3}, r"storage '/tmp/mw' is on each node's own disk, but nodes is 3: a "
                                         r"multi-node run needs storage every node sees"),
    ({"storage": "runs"}, r"storage 'runs' is relative: give an absolute path"),
    ({"address": "headnode"}, r"address: 'headnode' is not a Ray address"),
    ({"runtime_env": {"working_dir": ".", "env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}},
     r"env_vars AWS_SECRET_ACCESS_KEY look like credentials; they never go into a job's runtime_env"),
], ids=["unknown-key", "workers-0", "gpus-2", "node-local-storage", "relative-storage", "address", "credentials"])
def test_a_broken_profile_fails_with_one_line(tmp_path, fields, expected):
    path = write_profile(tmp_path / "bad.yaml", **fields)
    with pytest.raises(UserError) as err:
        load_profile(str(path))
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"invalid cluster profile {path}: "), err.value
    assert re.search(expected, str(err.value)), err.value


def test_node_local_storage_is_fine_on_one_node_and_shared_storage_on_many(tmp_path):
    assert load_profile(str(write_profile(tmp_path / "a.yaml", storage="/tmp/mw"))).storage_env() == \
        {"MODELWORKS_HOME": "/tmp/mw"}
    many = load_profile(str(write_profile(tmp_path / "b.yaml", storage="s3://b/mw", nodes=4)))
    assert many.storage_env() == {"MODELWORKS_STORAGE": "s3://b/mw", "MODELWORKS_REGISTRY": "s3://b/mw/registry"}
    with pytest.raises(UserError, match="no cluster profile 'nope': cluster/profiles/nope.yaml not found"):
        load_profile("nope")


def test_run_cluster_sets_address_storage_and_workers_and_the_command_line_wins(tmp_path, monkeypatch):
    for k in ("RAY_ADDRESS", "MODELWORKS_HOME", "MODELWORKS_CPUS_PER_WORKER"):
        monkeypatch.setenv(k, "")  # restored after the test: apply_to_run writes os.environ
    profile = Profile(address="ray://head:10001", storage=str(tmp_path / "shared"), workers=2, workers_per_trial=3,
                      gpus_per_worker=0, cpus_per_worker=1.5)
    cfg = load_workflow(DIGITS)
    assert apply_to_run(profile, cfg, [], resume=False) == ["train.workers=2", "train.use_gpu=false"]
    assert os.environ["RAY_ADDRESS"] == "ray://head:10001"
    assert os.environ["MODELWORKS_HOME"] == str(tmp_path / "shared")
    assert os.environ["MODELWORKS_CPUS_PER_WORKER"] == "1.5"
    # An explicit --set wins: the profile's item for that key is left out.
    given = ["train.workers=1"]
    assert profile.overrides(apply_overrides(cfg, given), given) == ["train.use_gpu=false"]
    # A search: workers per trial, and the CPUs of a whole trial.
    searching = apply_overrides(cfg, ["search.enabled=true"])
    assert profile.overrides(searching, ["search.enabled=true"]) == \
        ["train.workers=3", "train.use_gpu=false", "search.cpus_per_trial=4.5"]
    assert apply_to_run(profile, cfg, [], resume=True) == []  # --resume keeps the run's own config
    # The job API is no Ray address for `run`.
    with pytest.raises(UserError, match=r"address http://h:8265 is a job API: `modelworks submit"):
        Profile(address="http://h:8265").run_address()


@pytest.mark.ray
def test_cpus_per_worker_is_what_each_training_worker_asks_for(ray_local, monkeypatch):
    from modelworks.train import plan_cpus

    assert plan_cpus(1, False).cpus_per_worker == 1.0  # 2 CPUs, 1 kept for Ray Data: the default share
    assert plan_cpus(2, False).cpus_per_worker == 0.5
    assert plan_cpus(2, False, data_cpus=0).cpus_per_worker == 1.0  # data in the object store: nothing kept
    monkeypatch.setenv("MODELWORKS_CPUS_PER_WORKER", "0.25")
    assert plan_cpus(2, False).cpus_per_worker == 0.25
    monkeypatch.setenv("MODELWORKS_CPUS_PER_WORKER", "2")
    with pytest.raises(UserError, match=r"^1 worker\(s\) x 2 CPUs \(the profile's cpus_per_worker\) do not fit on 2 "
                                        r"CPUs with 1 kept for data; lower cpus_per_worker or workers$"):
        plan_cpus(1, False)


def test_run_with_a_missing_profile_is_one_line(capsys):
    assert main(["run", str(DIGITS), "--cluster", "nope", "--steps"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no cluster profile 'nope'") and err.count("\n") == 1, err


def test_submit_entrypoint_and_runtime_env(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-a-job")
    profile = Profile(storage="/mnt/shared/mw", workers=2, gpus_per_worker=1, nodes=3)
    env = profile.job_runtime_env()
    assert env["working_dir"] == str(REPO)
    assert env["env_vars"] == {"MODELWORKS_PROGRESS": "0", "MODELWORKS_HOME": "/mnt/shared/mw"}
    assert "never-in-a-job" not in json.dumps(env)
    assert entrypoint("workflows/digits.py", ["--set", "train.epochs=2"], profile, env["working_dir"]) == \
        ("modelworks run workflows/digits.py --set train.workers=2 --set train.use_gpu=true "
         "--set train.epochs=2 --json")
    assert entrypoint(str(DIGITS), ["--workers", "1", "--json"], profile, str(REPO)) == \
        "modelworks run workflows/digits.py --set train.use_gpu=true --workers 1 --json"
    outside = write_profile(tmp_path / "w.py", x=1)
    with pytest.raises(UserError, match="is outside the job's working_dir"):
        entrypoint(str(outside), [], profile, str(REPO))
    with pytest.raises(UserError, match=r"unknown config key 'train.epoch'"):
        entrypoint("workflows/digits.py", ["--set", "train.epoch=2"], profile, str(REPO))


# -------------------------------------------------------------------------------------- real job API
@pytest.fixture
def job_api(ray_head, tmp_path, monkeypatch):
    """A profile for the session's cluster (storage: a fresh folder), and this process set up as a user with
    the cluster's token would be."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head["token_file"]))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = tmp_path / "storage"
    path = write_profile(tmp_path / "head.yaml", address=ray_head["address"], storage=str(storage), nodes=1)
    return {"profile": str(path), "storage": storage, **ray_head}


@pytest.mark.ray
@pytest.mark.slow
def test_jobs_stop_stops_a_running_job(job_api):
    jobs = Jobs(load_profile(job_api["profile"]))
    job_id = jobs.submit("python -c 'import time; print(\"sleeping\", flush=True); time.sleep(120)'")
    deadline = time.time() + 60
    while jobs.info(job_id).status.value != "RUNNING":
        assert time.time() < deadline, jobs.info(job_id)
        time.sleep(0.3)
    t0 = time.time()
    assert jobs.stop(job_id) == "STOPPED"
    assert time.time() - t0 < 30
    info = jobs.info(job_id)
    assert info.status.value == "STOPPED" and "\n" not in failure_cause(info)
    assert job_id in [j.submission_id for j in jobs.list()]
    with pytest.raises(UserError, match=r"^no job 'raysubmit_nope' at http://127.0.0.1:\d+ "):
        jobs.info("raysubmit_nope")


@pytest.mark.ray
@pytest.mark.slow
def test_submit_without_the_token_is_refused_in_one_line(job_api, tmp_path):
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in job_api["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path / "empty")  # no ~/.ray/auth_token either
    denied = subprocess.run([str(VENV_BIN / "modelworks"), "submit", "workflows/digits.py", "--cluster",
                             job_api["profile"], "--no-wait"], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert denied.returncode == 2 and denied.stdout == "", denied
    assert denied.stderr.startswith(f"error: the Ray job API at {job_api['address']} needs the cluster's token "
                                    f"(401): set RAY_AUTH_MODE=token"), denied.stderr
    assert denied.stderr.count("\n") == 1, denied.stderr
    # A wrong token: 403, one line too (the same code path, in this process).
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with pytest.raises(UserError, match=r"refused the token \(403\)"):
            Jobs(load_profile(job_api["profile"])).list()


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_job_exits_1_with_the_runs_own_error(job_api):
    """The run fails on the cluster (before it starts Ray): submit follows it, then prints the final status and
    the run's one-line error, and exits 1."""
    proc = subprocess.run([str(VENV_BIN / "modelworks"), "submit", "workflows/digits.py", "--cluster",
                           job_api["profile"], "--", "--resume", "no-such-run"],
                          env=job_api["env"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc
    job_id = proc.stdout.splitlines()[0]
    assert "error: --resume no-such-run: no such run" in proc.stdout  # the job's log, as it came
    assert re.fullmatch(rf"job {job_id} FAILED: error: --resume no-such-run: no such run in "
                        rf"{job_api['storage']}/runs; `modelworks runs list` shows the runs\n", proc.stderr), \
        proc.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_modelworks_submit_runs_the_digits_workflow(ray_local, job_api, capsys):
    """`modelworks submit` end to end: the id, the run's own lines and its summary as they come, exit 0;
    `jobs status|list|logs` on the job; the model in the profile's storage; and the exact accuracy the same
    run gives on this machine directly."""
    t0 = time.time()
    proc = subprocess.run([str(VENV_BIN / "modelworks"), "submit", "workflows/digits.py", "--cluster",
                           job_api["profile"], "--", "--set", "train.epochs=2"],
                          env={**job_api["env"], "MODELWORKS_HOME": "/nonexistent"},  # the profile's storage wins
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = lines[0]
    assert re.fullmatch(r"modelworks-digits-[0-9a-f]{8}", job_id), lines[:3]
    assert any(re.search(r"epoch 2/2 +train_loss=", line) for line in lines), proc.stdout[-3000:]
    summary = json.loads(lines[-1])  # the run's --json summary is the job's last line
    # A fresh storage folder: the job's model is the first version there is, complete, in the profile's storage.
    assert summary["model"] == "digits@1", summary
    vdir = job_api["storage"] / "registry" / "digits" / "1"
    assert json.loads((vdir / "version.json").read_text())["test_accuracy"] == \
        pytest.approx(summary["test_accuracy"])
    assert (vdir / "checkpoint" / "model.json").is_file()

    capsys.readouterr()
    assert main(["jobs", "status", job_id, "--cluster", job_api["profile"]]) == 0
    status = capsys.readouterr().out
    assert re.match(rf"{job_id}  SUCCEEDED  .*  modelworks run workflows/digits.py --set train.epochs=2 --json$",
                    status.strip()), status
    assert main(["jobs", "list", "--cluster", job_api["profile"]]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--cluster", job_api["profile"]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary

    # Training is deterministic (fixed seed, same thread count): the same command run directly on this machine
    # (same config digest, hence the same run name) gives exactly the job's accuracies. A reference run here,
    # not a hard-coded figure: float rounding, hence a 2-epoch model, may differ on other CPUs.
    from modelworks.workflow import run_workflow

    reference = run_workflow(apply_overrides(load_workflow(DIGITS), ["train.epochs=2"]), log=lambda m: None)
    assert summary["run"] == reference.run, (summary, reference)
    assert (summary["test_accuracy"], summary["val_accuracy"]) == \
        (reference.test_accuracy, reference.val_accuracy), (summary, reference)
    print(f"modelworks submit digits (2 epochs): {took:.1f} s, test_accuracy={summary['test_accuracy']:.4f}")


def test_a_job_api_failure_is_one_line_with_the_servers_reason():
    from modelworks.jobs import api_errors

    with pytest.raises(UserError, match=r"^the Ray job API at http://h:8265 answered 500: No available agent to "
                                        r"submit job, please try again later$"):
        with api_errors("http://h:8265"):
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, "
                               "please try again later..")
    with pytest.raises(UserError, match=r"^no job 'j1' at http://h:8265 "):
        with api_errors("http://h:8265", "j1"):
            raise RuntimeError("Request failed with status code 404: Job j1 does not exist.")
