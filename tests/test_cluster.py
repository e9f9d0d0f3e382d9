"""cluster/: the deployment files validate offline, and the job API of a real cluster wants its token.

(a) Offline: every KubeRay manifest validates against its CRD's openAPIV3Schema (strict: unknown fields fail, as
    with `kubectl apply --validate=strict`), the launcher YAML against Ray's ray-schema.json, and every command
    that runs modelworks names a workflow file that exists. Each check is also shown to reject a broken copy.
(b) Real: a local `ray start --head` with token auth (tests/ray_head.py: own ports, own --temp-dir) refuses the
    job API, and `ray job submit`, to a caller without its token. `modelworks submit` of a whole workflow through
    it is tests/test_jobs.py.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import require_folder
from tests.ray_head import RAY, _pids_of, http, stop_own_cluster  # noqa: F401 - test_console imports the last two

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# The CRDs live beside the checkout, as the datasets do (../shared/schemas; .ci/run exports it resolved);
# MODELWORKS_SCHEMAS overrides. Missing: the CRD checks skip locally and fail under CI (require_folder).
SCHEMAS = Path(os.environ.get("MODELWORKS_SCHEMAS") or REPO.parent / "shared" / "schemas") / "kuberay-v1.7"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"


# ------------------------------------------------------------------------------------------ CRD -> JSON schema
def openapi_to_jsonschema(node):
    """A Kubernetes structural OpenAPI v3 schema as a JSON schema that jsonschema can enforce.

    - `nullable: true` also admits null;
    - objects that list `properties` (and neither `additionalProperties` nor
      `x-kubernetes-preserve-unknown-fields`) refuse unknown keys, as the API server's strict field
      validation does; without this a typo such as `entrypont:` would be silently pruned;
    - x-kubernetes-* markers and CEL rules are dropped (jsonschema ignores them anyway).
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def load_crds() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> validator of the converted schema, for every served version of every CRD in the schema folder."""
    crds = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["kind"] == "CustomResourceDefinition", path
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
                schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
                jsonschema.Draft7Validator.check_schema(schema)
                crds[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return crds


@pytest.fixture(scope="module")
def crds():
    require_folder(SCHEMAS, f"KubeRay CRD schemas not found at {SCHEMAS}; point MODELWORKS_SCHEMAS at a folder "
                            f"holding kuberay-v1.7/")
    return load_crds()


def kuberay_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/"):
                docs.append((path, doc))
    return docs


def validate_manifest(doc: dict, crds: dict) -> None:
    """Raise if the manifest's kind has no CRD, or the manifest breaks that CRD's schema."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in crds:
        raise LookupError(f"no served CRD for apiVersion={key[0]} kind={key[1]}; known: {sorted(crds)}")
    crds[key].validate(doc)
    name = doc["metadata"].get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise ValueError(f"metadata.name {name!r} is not a DNS-1123 label")


def cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs a manifest creates (RayCluster itself, RayJob, RayService, RayCronJob)."""
    spec = doc["spec"]
    return {"RayCluster": lambda: [spec], "RayJob": lambda: [spec["rayClusterSpec"]],
            "RayService": lambda: [spec["rayClusterConfig"]],
            "RayCronJob": lambda: [spec["jobTemplate"]["rayClusterSpec"]]}[doc["kind"]]()


def test_crd_mapping_covers_the_four_kinds(crds):
    kinds = {k for (_, k) in crds}
    assert kinds == {"RayCluster", "RayJob", "RayService", "RayCronJob"}
    assert ("ray.io/v1", "RayCronJob") in crds


def test_cluster_folder_holds_each_kind():
    kinds = sorted(doc["kind"] for _, doc in kuberay_docs())
    assert kinds == ["RayCluster", "RayCronJob", "RayJob", "RayService"], kinds


@pytest.mark.parametrize("path,doc", kuberay_docs(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_manifest_validates_against_its_crd(path, doc, crds):
    validate_manifest(doc, crds)


# One deliberate break per kind, each of a different sort, plus ones that apply to every kind.
def _typo_in_entrypoint(d):
    d["spec"]["entrypont"] = d["spec"].pop("entrypoint")


def _replicas_as_word(d):
    d["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"


def _no_schedule(d):
    del d["spec"]["schedule"]


def _serve_config_as_mapping(d):  # a classic: serveConfigV2 must be a YAML *string*, not nested YAML
    d["spec"]["serveConfigV2"] = yaml.safe_load(d["spec"]["serveConfigV2"])


def _unknown_kind(d):
    d["kind"] = "RayBatch"


def _wrong_group(d):
    d["apiVersion"] = "ray.io/v2"


def _bad_auth_mode(d):
    cluster_specs(d)[0]["authOptions"] = {"mode": "password"}


def _container_typo(d):
    cluster_specs(d)[0]["headGroupSpec"]["template"]["spec"]["containers"][0]["imag"] = "x"


def _bad_name(d):
    d["metadata"]["name"] = "Modelworks_MNIST"


PER_KIND = {"RayJob": _typo_in_entrypoint, "RayCluster": _replicas_as_word, "RayCronJob": _no_schedule,
            "RayService": _serve_config_as_mapping}


@pytest.mark.parametrize("path,doc", kuberay_docs(), ids=lambda x: x.name if isinstance(x, Path) else "")
@pytest.mark.parametrize("breakage", [None, _unknown_kind, _wrong_group, _bad_auth_mode, _container_typo, _bad_name],
                         ids=lambda f: f.__name__ if f else "per-kind")
def test_a_broken_copy_fails_validation(path, doc, breakage, crds):
    broken = copy.deepcopy(doc)
    (breakage or PER_KIND[doc["kind"]])(broken)
    with pytest.raises((jsonschema.ValidationError, LookupError, ValueError)):
        validate_manifest(broken, crds)


def test_rayservice_serve_config_parses_and_has_applications():
    services = [doc for _, doc in kuberay_docs() if doc["kind"] == "RayService"]
    assert services
    for doc in services:
        serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
        apps = serve_cfg["applications"]
        assert apps and all(a.get("import_path") and a.get("name") for a in apps)
        module, _, attr = apps[0]["import_path"].partition(":")
        assert (REPO / "src" / Path(*module.split("."))).with_suffix(".py").is_file(), module
        assert re.search(rf"^def {attr}\(", (REPO / "src" / Path(*module.split("."))).with_suffix(".py")
                         .read_text(), re.M), apps[0]["import_path"]
    broken = "applications: [\n  - name: x"
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(broken)


def test_rayservice_nodes_start_with_the_fast_serve_ingress():
    """Serve reads its ingress mode when the node starts: the RayService containers must carry SERVE_ENV."""
    from modelworks.serve import SERVE_ENV

    services = [doc for _, doc in kuberay_docs() if doc["kind"] == "RayService"]
    assert services
    for doc in services:
        for containers in _containers(doc["spec"]["rayClusterConfig"]):
            env = {e["name"]: e.get("value") for e in containers[0].get("env", [])}
            missing = {k: v for k, v in SERVE_ENV.items() if env.get(k) != v}
            assert not missing, f"{doc['metadata']['name']}: container {containers[0]['name']} lacks {missing}"


# ------------------------------------------------------------------------------------- security of the specs
def _containers(spec: dict):
    yield spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["template"]["spec"]["containers"]


def token_auth_on(spec: dict) -> bool:
    """authOptions.mode=token, or RAY_AUTH_MODE=token on every Ray container (the pre-authOptions way)."""
    if spec.get("authOptions", {}).get("mode") == "token":
        return True
    for containers in _containers(spec):
        env = {e["name"]: e.get("value") for e in containers[0].get("env", [])}
        if env.get("RAY_AUTH_MODE") != "token" or "RAY_AUTH_TOKEN" not in env:
            return False
    return True


def job_port_private(spec: dict) -> bool:
    head = spec["headGroupSpec"]
    return head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)


@pytest.mark.parametrize("path,doc", kuberay_docs(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_clusters_use_token_auth_and_keep_the_job_port_private(path, doc):
    for spec in cluster_specs(doc):
        assert token_auth_on(spec), f"{path.name}: token auth is off"
        assert job_port_private(spec), f"{path.name}: dashboard/job port exposed"
        version = tuple(int(p) for p in spec["rayVersion"].split(".")[:2])
        assert version >= (2, 52), "token auth needs Ray >= 2.52"
        broken = copy.deepcopy(spec)
        broken.pop("authOptions", None)
        for containers in _containers(broken):
            containers[0]["env"] = [e for e in containers[0].get("env", []) if e["name"] != "RAY_AUTH_MODE"]
        assert not token_auth_on(broken)
        broken["headGroupSpec"]["serviceType"] = "LoadBalancer"
        assert not job_port_private(broken)


def test_owned_kuberay_manifests_enable_autoscaling_with_a_gpu_group():
    for name in ("raycluster.yaml", "rayjob-mnist.yaml", "raycronjob-retrain.yaml"):
        (doc,) = [d for p, d in kuberay_docs() if p.name == name]
        (spec,) = cluster_specs(doc)
        assert spec["enableInTreeAutoscaling"] is True, name
        gpu = [g for g in spec["workerGroupSpecs"]
               if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu and gpu[0]["maxReplicas"] >= 2, name
    (job,) = [d for p, d in kuberay_docs() if p.name == "rayjob-mnist.yaml"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] and "/data" in env["excludes"]
    head_env = {e["name"]: e["value"] for e in
                job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert re.match(r"^(s3|gs)://", head_env["MODELWORKS_REGISTRY"]), "registry must be shared storage"


# ------------------------------------------------------------------------ commands name existing workflows
def modelworks_commands(obj) -> list[list[str]]:
    """Every `modelworks ...` command line found in the string values of a parsed YAML document."""
    found = []
    if isinstance(obj, dict):
        for v in obj.values():
            found += modelworks_commands(v)
    elif isinstance(obj, list):
        for v in obj:
            found += modelworks_commands(v)
    elif isinstance(obj, str):
        for line in re.split(r"[\n;&|]+", obj):
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            for i, w in enumerate(words):
                if Path(w).name == "modelworks":
                    found.append(words[i:])
    return found


def workflow_problems(commands: list[list[str]], root: Path = REPO) -> list[str]:
    problems = []
    for words in commands:
        if len(words) > 1 and words[1] in ("run", "tune", "train"):
            target = next((w for w in words[2:] if not w.startswith("-")), None)
            if target is None or not target.endswith(".py") or not (root / target).is_file():
                problems.append(f"{' '.join(words)}: workflow {target!r} does not exist")
    return problems


def _all_yaml_docs():
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            yield path, doc


def test_every_manifest_that_runs_modelworks_names_an_existing_workflow():
    runners = {}
    for path, doc in _all_yaml_docs():
        commands = modelworks_commands(doc)
        if any(len(c) > 1 and c[1] == "run" for c in commands):
            runners[path.name] = commands
        assert workflow_problems(commands) == [], path.name
    assert {"rayjob-mnist.yaml", "raycronjob-retrain.yaml"} <= set(runners), runners
    (job,) = [d for p, d in kuberay_docs() if p.name == "rayjob-mnist.yaml"]
    assert shlex.split(job["spec"]["entrypoint"])[:4] == ["modelworks", "run", "workflows/mnist.py", "--workers"]
    # ...and the check fails on a wrong path.
    broken = copy.deepcopy(job)
    broken["spec"]["entrypoint"] = "modelworks run workflows/mnst.py --workers 2 --json"
    assert workflow_problems(modelworks_commands(broken))


# ----------------------------------------------------------------------------------- cluster launcher YAML
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_launcher(cfg: dict) -> None:
    """The schema check `ray up` runs, then Ray's own semantic checks on the filled-out config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cfg, ray_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_launcher_yaml_validates_against_ray_schema():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    validate_launcher(cfg)
    types = cfg["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t.get("min_workers", 0) == 0 for t in gpu), "GPU workers should scale from zero"
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-c requirements.lock ." in setup


@pytest.mark.parametrize("breakage", ["unknown_key", "head_type_missing", "resources_as_text", "no_provider"])
def test_a_broken_launcher_copy_fails(breakage):
    cfg = yaml.safe_load(LAUNCHER.read_text())
    if breakage == "unknown_key":
        cfg["max_wokers"] = 3
    elif breakage == "head_type_missing":
        cfg["head_node_type"] = "head.gpu"
    elif breakage == "resources_as_text":
        cfg["available_node_types"]["worker.gpu"]["resources"]["GPU"] = "one"
    else:
        del cfg["provider"]
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_launcher(cfg)


def test_launcher_turns_on_token_auth_and_keeps_the_dashboard_local():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    head = " ".join(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head
    token_mount = [dst for dst, src in cfg["file_mounts"].items() if "auth_token" in src]
    assert token_mount, "the token must reach every node"
    ssh = cfg["provider"]["security_group"]["IpPermissions"]
    assert all(r["CidrIp"] != "0.0.0.0/0" for perm in ssh for r in perm["IpRanges"])


# ------------------------------------------------------------------------------------------- runtime_env
def runtime_env_matcher(excludes: list[str]):
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher `ray job submit` itself uses

    return PathSpec.from_lines("gitwildmatch", excludes).match_file


def test_runtime_env_excludes_what_it_should_and_keeps_the_code():
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert env["working_dir"] == "."
    excluded = runtime_env_matcher(env["excludes"])
    for p in (".git/HEAD", ".venv/bin/python", "data/mnist/train-images-idx3-ubyte", "runs/x/ckpt",
              "bench/results/serve_load.json"):
        assert excluded(p), p
    for p in ("workflows/digits.py", "workflows/mnist.py", "src/modelworks/data/sources.py", "pyproject.toml",
              "bench/serve_load.py"):
        assert not excluded(p), p
    # The upload Ray would build from this checkout fits its 100 MiB cap with room to spare.
    total = 0
    for dirpath, dirnames, filenames in os.walk(REPO):
        rel = Path(dirpath).relative_to(REPO)
        dirnames[:] = [d for d in dirnames if not excluded((rel / d).as_posix() + "/")]
        total += sum((Path(dirpath) / f).stat().st_size for f in filenames
                     if not excluded((rel / f).as_posix()) and (Path(dirpath) / f).is_file())
    assert total < 20 * 2**20, f"working_dir upload would be {total / 2**20:.1f} MiB"
    # ...and the matcher is not vacuous: without excludes, .git alone is counted.
    assert not runtime_env_matcher([])(".git/HEAD")


# ---------------------------------------------------------------------------- (b) the real job API
# The cluster: the session's `ray_head` fixture (tests/ray_head.py). `modelworks submit` of a whole workflow
# through it, with `modelworks jobs ...`, is tests/test_jobs.py.
@pytest.mark.ray
@pytest.mark.slow
def test_job_api_refuses_callers_without_the_token(ray_head, tmp_path):
    address, token = ray_head["address"], ray_head["token"]
    assert http(f"{address}/api/jobs/")[0] == 401
    assert http(f"{address}/api/jobs/", "0" * 64)[0] in (401, 403)  # a wrong token: 403 on Ray 2.60
    assert http(f"{address}/api/jobs/", token)[0] == 200
    # The CLI without the token (empty HOME, no RAY_AUTH_TOKEN*) cannot submit either.
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in ray_head["env"].items() if not k.startswith("RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path / "empty")
    denied = subprocess.run([RAY, "job", "submit", "--address", address, "--no-wait", "--", "echo", "hi"],
                            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert denied.returncode != 0
    assert re.search(r"Authentication|401|Unauthorized", denied.stdout + denied.stderr), denied.stderr[-1500:]
