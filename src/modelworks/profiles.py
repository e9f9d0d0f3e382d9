"""Cluster profiles: where a workflow runs, in one small YAML file, ``cluster/profiles/<name>.yaml``.

``modelworks run WORKFLOW --cluster NAME`` and ``modelworks submit WORKFLOW --cluster NAME`` read one. The
profile ``local`` is the default and needs no file: the Ray on this machine, storage in ``$MODELWORKS_HOME``.
A profile is data, checked as strictly as a workflow config: an unknown key, a wrong type or storage a
multi-node cluster cannot share fails with one line naming the problem and the fix. What each field becomes:

    address            run: RAY_ADDRESS (ray://HOST:10001, HOST:6379, auto; none = local Ray)
                       submit / jobs: the job API (http://HEAD:8265)
    storage            an absolute path: MODELWORKS_HOME (runs, checkpoints, registry)
                       a URI (s3://, gs://): MODELWORKS_STORAGE=<uri> (checkpoints: <uri>/runs, storage.py) and
                       MODELWORKS_REGISTRY=<uri>/registry; the rest of a run folder (manifest, logs, cached
                       data) stays in the driver's MODELWORKS_HOME. Credentials come from each node's
                       environment, never from the profile
    workers            --set train.workers=N for a training run
    workers_per_trial  --set train.workers=N when the workflow searches (search.enabled)
    cpus_per_worker    MODELWORKS_CPUS_PER_WORKER (train.plan_cpus); a search: --set search.cpus_per_trial
    gpus_per_worker    0 or 1: --set train.use_gpu=false|true
    runtime_env        submit: the job's runtime_env (a YAML file, default cluster/runtime_env.yaml, or a mapping)
    nodes              the cluster's node count, to check storage against (more than 1: storage must be shared)

A ``--set`` (or --workers / --gpu) given on the command line wins over the profile.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from modelworks.errors import UserError

PROFILES_DIR = Path("cluster") / "profiles"  # relative to the checkout, where the commands run
DEFAULT_RUNTIME_ENV = "cluster/runtime_env.yaml"
# Paths that live on one node's own disk: a multi-node run's workers would each write their own copy.
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")
# Environment variable names that hold secrets: never written into a job's runtime_env (Ray keeps it in its
# GCS and shows it in the dashboard and `ray job list`); the cluster's nodes get credentials of their own.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY|_KEY$", re.I)
ADDRESS = re.compile(r"^(auto|(ray|https?)://\S+|[^\s:/]+:\d+)$")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="ray://HOST:10001, HOST:PORT or auto for run; http(s)://HEAD:8265 "
                                                  "(the job API) for submit and jobs; none: the local Ray")
    storage: str | None = Field(None, description="absolute path (MODELWORKS_HOME) or URI (checkpoints, registry)")
    workers: int | None = Field(None, ge=1, description="training workers of a run")
    workers_per_trial: int | None = Field(None, ge=1, description="training workers of each search trial")
    cpus_per_worker: float | None = Field(None, gt=0)
    gpus_per_worker: Literal[0, 1] | None = Field(None, description="a training worker drives one GPU or none")
    runtime_env: str | dict[str, Any] = Field(DEFAULT_RUNTIME_ENV, description="submit: YAML file or mapping")
    nodes: int = Field(1, ge=1, description="nodes the cluster has (or scales to)")
    _name: str = PrivateAttr("local")

    @property
    def name(self) -> str:
        return self._name

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str | None) -> str | None:
        if v is not None and not ADDRESS.match(v):
            raise ValueError(f"'{v}' is not a Ray address: use http://HEAD:8265 (the job API, for submit), "
                             f"ray://HEAD:10001, HEAD:6379 or auto (for run)")
        return v

    @field_validator("runtime_env", mode="before")
    @classmethod
    def _check_runtime_env(cls, v):
        if isinstance(v, dict):
            check_runtime_env(v)
        elif not isinstance(v, str):
            raise ValueError(f"a runtime_env YAML file or a mapping (working_dir, excludes, env_vars), not {v!r}")
        return v

    @model_validator(mode="after")
    def _check_storage(self) -> "Profile":
        s = self.storage
        if s is None or is_uri(s):
            return self
        path = s.removeprefix("file://")
        if not path.startswith("/"):
            raise ValueError(f"storage '{s}' is relative: give an absolute path (or a URI such as s3://bucket/path); "
                             f"a job runs in a temporary copy of the checkout, and each node resolves it differently")
        if self.nodes > 1 and (path + "/").startswith(tuple(p + "/" for p in NODE_LOCAL)):
            raise ValueError(f"storage '{s}' is on each node's own disk, but nodes is {self.nodes}: a multi-node run "
                             f"needs storage every node sees (an NFS/EFS mount such as /mnt/efs/modelworks, or "
                             f"s3://bucket/path)")
        return self

    # -- what the profile becomes ------------------------------------------------------------------------
    def storage_env(self) -> dict[str, str]:
        """MODELWORKS_HOME (a path) or MODELWORKS_STORAGE and MODELWORKS_REGISTRY (a URI), plus the CPU share
        per training worker."""
        env = {}
        if self.storage and is_uri(self.storage):
            env["MODELWORKS_STORAGE"] = self.storage.rstrip("/")
            env["MODELWORKS_REGISTRY"] = self.storage.rstrip("/") + "/registry"
        elif self.storage:
            env["MODELWORKS_HOME"] = self.storage.removeprefix("file://")
        if self.cpus_per_worker:
            env["MODELWORKS_CPUS_PER_WORKER"] = f"{self.cpus_per_worker:g}"
        return env

    def overrides(self, cfg, given: list[str]) -> list[str]:
        """``--set`` items for a workflow whose config, with the command line's ``given`` overrides applied, is
        ``cfg``; keys the command line sets itself are left out (it wins)."""
        given_keys = {item.partition("=")[0] for item in given}
        search = cfg.search.enabled
        workers = self.workers_per_trial if search else self.workers
        out = {}
        if workers:
            out["train.workers"] = str(workers)
        if self.gpus_per_worker is not None:
            out["train.use_gpu"] = "true" if self.gpus_per_worker else "false"
        if search and self.cpus_per_worker:
            trial_workers = cfg.train.workers if "train.workers" in given_keys else (workers or cfg.train.workers)
            out["search.cpus_per_trial"] = f"{self.cpus_per_worker * trial_workers:g}"
        return [f"{k}={v}" for k, v in out.items() if k not in given_keys]

    def run_address(self) -> str | None:
        """The RAY_ADDRESS `modelworks run` joins (None: the local Ray, as without a profile)."""
        if self.address and self.address.startswith(("http://", "https://")):
            raise UserError(f"profile '{self.name}': address {self.address} is a job API: `modelworks submit "
                            f"WORKFLOW --cluster {self.name}` runs there; `run --cluster` needs a Ray address "
                            f"(ray://HEAD:10001, HEAD:6379 or auto)")
        return self.address

    def job_address(self) -> str | None:
        """The job API `submit` and `jobs` talk to (None: Ray's default, RAY_ADDRESS or this machine's)."""
        if self.address in (None, "auto") or self.address.startswith(("http://", "https://")):
            return None if self.address == "auto" else self.address
        raise UserError(f"profile '{self.name}': address {self.address} is not a job API; `modelworks submit` and "
                        f"`modelworks jobs` need the head's dashboard address, e.g. http://127.0.0.1:8265")

    def job_runtime_env(self) -> dict[str, Any]:
        """The runtime_env of a job: the profile's (a file is read relative to this checkout), a local
        working_dir made absolute, and the storage variables added to its env_vars."""
        if isinstance(self.runtime_env, dict):
            env = copy.deepcopy(self.runtime_env)
        else:
            path = Path(self.runtime_env)
            if not path.is_file():
                raise UserError(f"profile '{self.name}': runtime_env file {path} not found (run from the checkout's "
                                f"root, or give the path from there)")
            env = _read_yaml(path, f"runtime_env {path}") or {}
            check_runtime_env(env, where=f"runtime_env {path}")
        wd = env.get("working_dir")
        if isinstance(wd, str) and not is_uri(wd):
            env["working_dir"] = str(Path(wd).resolve())
        ours = self.storage_env()
        clash = sorted(set(ours) & set(env.get("env_vars") or {}))
        if clash:
            raise UserError(f"profile '{self.name}': runtime_env env_vars sets {', '.join(clash)}, which the profile's "
                            f"storage/cpus_per_worker set: keep one")
        env["env_vars"] = {**(env.get("env_vars") or {}), **ours}
        return env


def is_uri(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def check_runtime_env(env: Any, where: str | None = None) -> None:
    """A mapping whose env_vars hold no credential. Raises UserError naming ``where`` (a file), else
    ValueError (pydantic puts the field's name in front)."""
    fail = (lambda m: UserError(f"{where}: {m}")) if where else ValueError
    if not isinstance(env, dict):
        raise fail("expected a mapping (working_dir, excludes, env_vars, ...)")
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise fail("env_vars must be a mapping of names to strings")
    secret = sorted(k for k in env_vars if SECRET_NAME.search(str(k)))
    if secret:
        raise fail(f"env_vars {', '.join(secret)} look like credentials; they never go into a job's "
                         f"runtime_env (Ray stores and shows it): give the cluster's nodes their own (an IAM role, "
                         f"IRSA/Workload Identity, a Kubernetes Secret)")


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{what} is not valid YAML: {getattr(err, 'problem', None) or err}{at}") from None


def format_profile_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}' (known: {', '.join(Profile.model_fields)})")
        elif not e["loc"] or e["type"] == "value_error":
            parts.append((f"{loc}: " if loc else "") + e["msg"].removeprefix("Value error, "))
        else:
            parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def profile_path(name: str) -> Path:
    """A name (cluster/profiles/<name>.yaml) or a path to a profile file."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        return Path(name)
    return PROFILES_DIR / f"{name}.yaml"


def load_profile(name: str | None) -> Profile:
    """The profile ``name`` names (None: ``local``). Raises UserError with one line when it is missing or invalid."""
    name = name or "local"
    path = profile_path(name)
    if not path.is_file():
        if name == "local":
            return Profile()
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")) if PROFILES_DIR.is_dir() else []
        raise UserError(f"no cluster profile '{name}': {path} not found (profiles here: "
                        f"{', '.join(known) or 'none'}; or give the path of a .yaml file)")
    data = _read_yaml(path, f"cluster profile {path}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"cluster profile {path}: expected a mapping of fields (address, storage, workers, ...)")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as err:
        raise UserError(f"invalid cluster profile {path}: {format_profile_error(err)}") from None
    profile._name = path.stem if path.parent == PROFILES_DIR else str(path)
    return profile


def apply_to_run(profile: Profile, cfg, given: list[str], resume: bool) -> list[str]:
    """``modelworks run --cluster``: the profile's address and storage into this process's environment
    (Ray and the run read them from there), and its --set items ahead of the command line's. A --resume
    keeps the run's own config, so it gets no overrides."""
    address = profile.run_address()
    if address:
        os.environ["RAY_ADDRESS"] = address
    os.environ.update(profile.storage_env())
    return [] if resume else profile.overrides(cfg, given)
