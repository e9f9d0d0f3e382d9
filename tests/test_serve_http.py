"""The Serve app over real HTTP on 127.0.0.1, on a real local Ray (no mocks).

One app for the module: `digits@production` (v1; v2 is a differently trained version) on a free port.
"""
from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from modelworks.config import ServeConfig
from modelworks.serve.testing import digits_data, free_port, register_digits
from tests.conftest import serve_fresh_registry

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve

    def two_versions(reg):
        register_digits(reg, random_seed=0, steps=300)          # v1
        register_digits(reg, random_seed=1, steps=60, hidden=(16,))  # v2: different weights, different answers
        reg.set_alias("digits", "production", 1)

    cfg = ServeConfig(alias_poll_s=0.5, max_inputs=64, max_body_bytes=1 << 20, min_replicas=1, max_replicas=1)
    reg, home, url = serve_fresh_registry(tmp_path_factory, "serve_home", two_versions, "digits@production", cfg)
    x, y = digits_data()
    local = {v: reg.load(f"digits@{v}")[0] for v in (1, 2)}
    yield {"url": url, "reg": reg, "home": home, "x": x, "y": y, "local": local}
    serve.shutdown()


def post(url, body, **kw):
    return requests.post(url, data=json.dumps(body) if not isinstance(body, (bytes, str)) else body,
                         headers=kw.pop("headers", {"Content-Type": "application/json"}), timeout=30, **kw)


def expected_labels(served, version, x):
    return [str(i) for i in served["local"][version].predict_proba(x).numpy().argmax(1)]


def test_predict_single_and_batch(served):
    u, x, y = served["url"], served["x"], served["y"]
    r = post(u + "/predict", {"input": x[7].reshape(-1).tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "digits" and body["model_version"] == 1
    pred = body["predictions"][0]
    assert pred["label"] == expected_labels(served, 1, x[7:8])[0] and pred["model_version"] == 1
    assert set(pred["probabilities"]) == {str(i) for i in range(10)}
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-4
    want = served["local"][1].predict_proba(x[7:8]).numpy()[0]
    assert np.allclose([pred["probabilities"][str(i)] for i in range(10)], want, atol=1e-5)

    r = post(u + "/predict", {"inputs": x[:40].tolist()})  # 8x8 nested lists
    assert r.status_code == 200, r.text
    labels = [p["label"] for p in r.json()["predictions"]]
    assert labels == expected_labels(served, 1, x[:40])
    assert np.mean(np.array(labels, dtype=int) == y[:40]) > 0.9  # a real model, not noise


def test_predict_png(served):
    import base64
    import io

    from PIL import Image

    img = (served["x"][3] * 255 / 16).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    r = post(served["url"] + "/predict", {"input": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] == str(served["y"][3])


def test_health_ready_docs(served):
    u = served["url"]
    assert requests.get(u + "/healthz").json() == {"status": "ok"}
    ready = requests.get(u + "/readyz").json()
    assert ready["ready"] is True and ready["model_version"] == 1
    assert requests.get(u + "/v2/health/live").json() == {"live": True}
    assert requests.get(u + "/v2/health/ready").json() == {"ready": True}
    assert requests.get(u + "/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    docs = requests.get(u + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = requests.get(u + "/openapi.json").json()["paths"]
    assert {"/predict", "/v2/models/{name}/infer"} <= set(paths)


def test_v2_metadata_and_infer_round_trip(served):
    u, x = served["url"], served["x"]
    meta = requests.get(u + "/v2/models/digits").json()
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8]}]
    n = 5
    body = {"id": "abc", "inputs": [{"name": "input", "shape": [n, 8, 8], "datatype": "FP32",
                                     "data": x[:n].reshape(-1).astype(np.float32).tolist()}]}
    r = post(u + "/v2/models/digits/infer", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "digits" and out["model_version"] == "1" and out["id"] == "abc"
    probs = next(o for o in out["outputs"] if o["name"] == "probabilities")
    assert probs["datatype"] == "FP32" and probs["shape"] == [n, 10]
    want = served["local"][1].predict_proba(x[:n]).numpy()
    assert np.allclose(np.array(probs["data"]).reshape(n, 10), want, atol=1e-5)
    labels = next(o for o in out["outputs"] if o["name"] == "label")
    assert labels["shape"] == [n] and labels["data"] == expected_labels(served, 1, x[:n])
    # versioned path: the served version answers, another version is 404
    assert post(u + "/v2/models/digits/versions/1/infer", body).status_code == 200
    assert post(u + "/v2/models/digits/versions/2/infer", body).status_code == 404


def assert_error(r, status, field=None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["expected"] and body["field"], body
    if field:
        assert body["field"] == field, body


def test_every_bad_input_class(served):
    u = served["url"]
    ok = [0.0] * 64
    v2 = lambda **t: {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": ok, **t}]}
    assert_error(post(u + "/predict", {"input": [0.0] * 63}), 422, "input")                       # wrong shape
    assert_error(post(u + "/v2/models/digits/infer", v2(shape=[1, 8, 7])), 422, "inputs[0].shape")
    assert_error(post(u + "/v2/models/digits/infer", v2(datatype="BYTES")), 422, "inputs[0].datatype")
    assert_error(post(u + "/v2/models/digits/infer", v2(datatype="INT32", data=[0.5] * 64)), 422, "inputs[0].data")
    assert_error(post(u + "/predict", '{"input": [' + "1," * 63 + "NaN]}"), 422, "input[63]")      # NaN
    assert_error(post(u + "/predict", '{"input": [' + "1," * 63 + "Infinity]}"), 422, "input[63]")  # inf
    assert_error(post(u + "/predict", {"input": ["a"] * 64}), 422, "input")                       # non-numeric
    assert_error(post(u + "/predict", {"inputs": []}), 422, "inputs")                             # empty batch
    assert_error(post(u + "/v2/models/digits/infer", v2(shape=[0, 8, 8], data=[])), 422, "inputs[0].shape")
    assert_error(post(u + "/predict", {"inputs": [ok] * 65}), 422, "inputs")                      # too many
    assert_error(post(u + "/v2/models/nosuch/infer", v2()), 404, "model_name")                    # unknown model
    assert_error(requests.get(u + "/v2/models/nosuch"), 404, "model_name")
    assert_error(post(u + "/predict", {"input": ok}, headers={"Content-Type": "text/plain"}), 415, "Content-Type")
    assert_error(requests.post(u + "/predict", data={"input": "1"}), 415, "Content-Type")       # form body
    big = '{"input": [' + ",".join(["1.000000"] * 160_000) + "]}"                                  # > 1 MiB
    assert len(big) > 1 << 20
    assert_error(post(u + "/predict", big), 413, "body")
    assert_error(post(u + "/predict", "{not json"), 400, "body")
    assert_error(requests.get(u + "/predict"), 405)
    assert_error(requests.get(u + "/etc/passwd"), 404, "path")
    # Nothing in a request names a file: an unknown field is refused, not interpreted.
    assert_error(post(u + "/predict", {"input": ok, "model_path": "/etc/passwd"}), 422, "model_path")


def malformed_requests(n: int, seed: int = 0):
    """Random requests, each malformed on purpose in a random way (generated, not listed)."""
    rng = random.Random(seed)

    def rand_scalar():
        return rng.choice([None, True, False, "x", "", {}, [], rng.random(), rng.randint(-5, 5), "1.5", 1e400,
                           -1e400, 10 ** 30])

    def bad_vector():
        k = rng.choice([0, 1, 8, 63, 65, 128, 784])
        v = [rng.uniform(0, 16) for _ in range(k)]
        if k == 64 or (k and rng.random() < 0.5):
            v[rng.randrange(len(v))] = rand_scalar() if rng.random() < 0.7 else float("nan")
            if k == 64 and all(isinstance(e, (int, float)) and not isinstance(e, bool) and abs(e) < 1e6
                               and e == e for e in v):
                v.append(1.0)  # still well-formed: break the shape instead
        return v

    def nested():
        depth = rng.randint(1, 40)
        v: object = [rng.random()]
        for _ in range(depth):
            v = [v] * rng.randint(1, 2)
        return v

    def bad_v2():
        t = {"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": [1.0] * 64}
        mutation = rng.randrange(7)
        if mutation == 0:
            t["shape"] = rng.choice([[1, 8], [2, 8, 8], [-1, 64], [1, 8, 8, 1], ["1", 8, 8], [], None, [0, 64]])
        elif mutation == 1:
            t["datatype"] = rng.choice(["BYTES", "BOOL", "fp32", "", None, 7, "FP128"])
        elif mutation == 2:
            t["data"] = bad_vector()
        elif mutation == 3:
            t["name"] = rng.choice(["x", "", None, 3])
        elif mutation == 4:
            del t[rng.choice(list(t))]
        elif mutation == 5:
            t["datatype"], t["data"] = rng.choice(["INT8", "UINT8", "INT32"]), [rng.uniform(-300, 300)] * 64
            t["data"][0] = 0.5
        else:
            return {"inputs": [t, t]}
        return {"inputs": [t]}

    for i in range(n):
        kind = rng.randrange(10)
        path, ctype = "/predict", "application/json"
        if kind == 0:
            body = json.dumps({"input": bad_vector()}, allow_nan=True)
        elif kind == 1:
            body = json.dumps({"inputs": [bad_vector() for _ in range(rng.randint(0, 3))] or []}, allow_nan=True)
        elif kind == 2:
            body = json.dumps(rng.choice([{"input": nested()}, {"inputs": nested()}, nested(), rand_scalar()]),
                              allow_nan=True)
        elif kind == 3:
            body = json.dumps({rng.choice(["inputs", "input", "path", "url", "model"]): rand_scalar(),
                               "extra": rand_scalar()}, allow_nan=True)
        elif kind == 4:
            good = json.dumps({"input": [1.0] * 64})
            cut = rng.randrange(1, len(good) - 1)
            body = good[:cut] + rng.choice(["", "}", "]]", "\x00", "\\u12", "'"])
        elif kind == 5:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        elif kind == 6:
            path = "/v2/models/" + rng.choice(["digits", "digits", "nosuch", "..%2F..%2Fetc"]) + "/infer"
            body = json.dumps(bad_v2(), allow_nan=True)
            if "nosuch" not in path and "etc" not in path and rng.random() < 0.1:
                ctype = "text/plain"
        elif kind == 7:
            # (no Content-Type at all is a JSON body, as Triton's and KServe's clients send it: not malformed)
            ctype = rng.choice(["text/plain", "application/octet-stream", "application/xml", "multipart/form-data",
                                "image/png"])
            body = json.dumps({"input": [1.0] * 64})
        elif kind == 8:
            body = json.dumps({"input": rng.choice(["", "AAAA", "data:image/png;base64,iVBORw0KGgo=",
                                                    "%%%", "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAI" * 3])})
        else:
            body = json.dumps({"inputs": [[1.0] * 64] * rng.choice([65, 200, 1000])})
        yield i, path, ctype, body


def test_1000_random_malformed_requests_never_5xx(served):
    u = served["url"]
    session = threading.local()

    def send(item):
        i, path, ctype, body = item
        s = getattr(session, "s", None) or requests.Session()
        session.s = s
        headers = {"Content-Type": ctype} if ctype else {}
        r = s.post(u + path, data=body if isinstance(body, bytes) else body.encode(), headers=headers, timeout=60)
        return i, r.status_code, r.text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, malformed_requests(1000)))
    assert len(results) == 1000
    by_status: dict[int, int] = {}
    for i, status, text in results:
        by_status[status] = by_status.get(status, 0) + 1
        assert 400 <= status < 500, (i, status, text[:300])
        body = json.loads(text)
        assert body["field"] and body["expected"], (i, body)
    assert len(by_status) >= 4, by_status  # the generator really hits different error classes
    # ...and the server still answers correctly.
    x = served["x"]
    r = post(u + "/predict", {"inputs": x[:10].tolist()})
    assert r.status_code == 200
    assert [p["label"] for p in r.json()["predictions"]] == expected_labels(served, 1, x[:10])


def test_load_shedding_503_when_queue_full(served):
    from ray import serve

    from modelworks.serve.app import build

    reg = served["reg"]
    # One request at a time, one waiting. Each request is 4,000 rows (~0.5 MB of JSON) that take the replica tens
    # of milliseconds to read, check and score, so twelve sent together overflow the queue. The body is encoded
    # once and the clients start at a barrier: encoding it in each thread (GIL-bound, tens of ms) spaced the
    # sends out in a loaded full-suite run, so that requests took turns (200, 503, 200, 503, ...).
    cfg = ServeConfig(max_batch_size=4, min_replicas=1, max_replicas=1, max_body_bytes=16 << 20, max_inputs=4000)
    serve.run(build("digits@1", reg.uri, cfg, max_ongoing_requests=1, max_queued_requests=1),
              name="shed", route_prefix="/shed", blocking=False)
    body = json.dumps({"inputs": [[0.0] * 64] * 4000})
    start = threading.Barrier(12)

    def client(_):
        start.wait()
        return post(served["url"] + "/shed/predict", body).status_code

    try:
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(client, range(12)))
        # At most two of twelve fit (one running, one queued) if all arrive together; stragglers may find room.
        assert codes.count(503) >= 4, codes
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 1
    finally:
        serve.delete("shed")


def test_request_timeout_answers_503_and_the_app_keeps_serving(served):
    from ray import serve

    from modelworks.serve.app import build

    # Requests that overlap wait for a batch of 16 that never fills (a 2 s window); the 0.3 s request timeout
    # ends them first. A request alone in the replica is not held for the window at all, so twelve clients send
    # requests back to back until one is timed out: requests answered in a millisecond may never overlap in one
    # burst (seen in a loaded full-suite run: twelve 200s), but once two meet, all that come while they wait do.
    cfg = ServeConfig(max_batch_size=16, batch_wait_timeout_s=2.0, request_timeout_s=0.3, min_replicas=1,
                      max_replicas=1)
    serve.run(build("digits@1", served["reg"].uri, cfg), name="slow", route_prefix="/slow", blocking=False)
    url = served["url"] + "/slow/predict"
    try:
        post(url, {"input": [0.0] * 64})  # the replica is up (a lone request: answered at once)
        start, stop = threading.Barrier(12), threading.Event()

        def client(_):
            start.wait()
            answers, deadline = [], time.time() + 5
            while not stop.is_set() and time.time() < deadline:
                t0 = time.perf_counter()
                r = post(url, {"input": [0.0] * 64})
                answers.append((r.status_code, r.json(), time.perf_counter() - t0))
                if r.status_code != 200:
                    stop.set()
            return answers

        with ThreadPoolExecutor(12) as pool:
            answers = [a for one in pool.map(client, range(12)) for a in one]
        timed_out = [body for code, body, _ in answers if code == 503]
        assert timed_out and all(code in (200, 503) for code, _, _ in answers), answers
        assert all(b["field"] == "request" and "timed out after 0.3s" in b["error"] for b in timed_out), timed_out
        assert max(t for _, _, t in answers) < 1.5, answers  # answered at the timeout, not after the 2 s window
        # The abandoned requests hold their batch until its window ends (Serve drops cancelled requests when the
        # batch forms); after that a lone request is answered at once, without waiting out the window.
        time.sleep(2.5)
        t0 = time.perf_counter()
        assert post(url, {"input": [0.0] * 64}).status_code == 200
        assert time.perf_counter() - t0 < 1.0
    finally:
        serve.delete("slow")


def test_access_log_lines_only_when_asked(served):
    import ray
    from ray import serve

    from modelworks.serve.app import build

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"

    def access_lines(app: str) -> list[str]:
        return [ln for f in logs.glob(f"replica_{app}_*.log") for ln in f.read_text().splitlines()
                if "/predict" in ln and " 200 " in ln]

    assert post(served["url"] + "/predict", {"input": [0.0] * 64}).status_code == 200
    assert access_lines("digits") == []  # the module's app runs with the default, access_log=false
    cfg = ServeConfig(access_log=True, min_replicas=1, max_replicas=1, alias_poll_s=0)
    serve.run(build("digits@1", served["reg"].uri, cfg), name="logged", route_prefix="/logged", blocking=False)
    try:
        for _ in range(3):
            assert post(served["url"] + "/logged/predict", {"input": [0.0] * 64}).status_code == 200
        deadline = time.time() + 10
        while len(access_lines("logged")) < 3 and time.time() < deadline:
            time.sleep(0.2)
        assert len(access_lines("logged")) == 3, access_lines("logged")
    finally:
        serve.delete("logged")


@pytest.mark.slow
def test_cli_serve_until_sigterm(served, tmp_path):
    """`modelworks serve MODEL --port P` in its own process: announces the URL, serves, stops on SIGTERM."""
    from tests.cli_process import CliProcess

    port = free_port()
    with CliProcess("serve", "digits@2", "--registry", served["reg"].uri, "--port", str(port),
                    env={"MODELWORKS_HOME": str(tmp_path / "home")}) as cli:
        cli.wait_for_line(f"serving digits@2 (version 2) at http://127.0.0.1:{port}", timeout=180)
        x = served["x"]
        r = post(f"http://127.0.0.1:{port}/predict", {"inputs": x[:10].tolist()})
        assert r.status_code == 200 and r.json()["model_version"] == 2
        assert [p["label"] for p in r.json()["predictions"]] == expected_labels(served, 2, x[:10])
        assert cli.terminate() == 0, cli.output[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_serve_build_config_deploys(served, tmp_path):
    """The file `serve build` writes is a valid Serve config whose import path builds a working app."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from modelworks.cli import main
    from modelworks.serve.app import build_app

    out = tmp_path / "serve_config.yaml"
    assert main(["serve", "build", "digits@2", "-o", str(out), "--registry", served["reg"].uri]) == 0
    cfg = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    import importlib

    assert getattr(importlib.import_module(module), attr) is build_app
    serve.run(build_app(app["args"]), name="fromconfig", route_prefix="/fromconfig", blocking=False)
    try:
        r = post(served["url"] + "/fromconfig/predict", {"input": [0.0] * 64})
        assert r.status_code == 200 and r.json()["model_version"] == 2
    finally:
        serve.delete("fromconfig")


def test_version_swap_under_concurrent_load(served):
    """promote (alias) and rollout (user_config -> reconfigure) while 8 clients hammer /predict: every request
    succeeds, responses name the version that answered, and the replica is the same process throughout."""
    from ray import serve

    from modelworks.serve import runner

    u, x, reg = served["url"], served["x"], served["reg"]
    handle = serve.get_app_handle("digits")
    pid_before = handle.replica_info.remote().result()["pid"]
    want = {v: expected_labels(served, v, x[:4]) for v in (1, 2)}
    stop = threading.Event()
    results: list[tuple[int, int | None, bool]] = []
    lock = threading.Lock()

    def client():
        s = requests.Session()
        while not stop.is_set():
            try:
                r = s.post(u + "/predict", json={"inputs": x[:4].tolist()}, timeout=30)
                v = r.json().get("model_version") if r.status_code == 200 else None
                consistent = r.status_code == 200 and [p["label"] for p in r.json()["predictions"]] == want[v]
                item = (r.status_code, v, consistent)
            except requests.RequestException:
                item = (-1, None, False)
            with lock:
                results.append(item)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        from modelworks.cli import main

        assert main(["models", "--registry", reg.uri, "promote", "digits", "2"]) == 0  # alias moves; replicas follow
        deadline = time.time() + 15
        while time.time() < deadline and not any(v == 2 for _, v, _ in results[-20:]):
            time.sleep(0.2)
        time.sleep(1)
        n_after_promote = len(results)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MODELWORKS_HOME", str(served["home"]))
            runner.rollout("digits@1", registry=reg.uri)  # user_config change -> reconfigure in place
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = [s for s, _, _ in results]
    assert len(results) > 100
    assert all(s == 200 for s in statuses), {s: statuses.count(s) for s in set(statuses)}
    assert all(c for _, _, c in results), "a response's labels did not match the version it named"
    versions = [v for _, v, _ in results]
    assert 2 in versions[:n_after_promote], "promote did not reach the replica"
    assert versions[-1] == 1, "rollout to digits@1 did not take effect"
    # the switch happened once each way: 1...1 2...2 1...1 (no flapping), apart from in-flight overlap
    switches = sum(1 for a, b in zip(versions, versions[1:]) if a != b)
    assert 2 <= switches <= 2 * 8, switches
    assert handle.replica_info.remote().result()["pid"] == pid_before, "replica restarted instead of reconfiguring"
