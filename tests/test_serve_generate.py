"""A character-level language model served over real HTTP on a real local Ray: POST /generate.

One Serve app for the module: `tinylm@latest` (a 2-layer, 32-wide CausalLM with random weights and a character
vocabulary, registered through the normal checkpoint + registry path) on a free port, plus a digits classifier
under /digits for the wrong-endpoint checks. The CLI test samples the same registered model without Ray.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from modelworks.config import ServeConfig
from modelworks.data import chars
from modelworks.models import build_model
from modelworks.registry import Registry
from modelworks.serve.testing import free_port, register_digits, register_model

pytestmark = pytest.mark.ray

MAX_PROMPT, MAX_NEW = 64, 1000
CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
          "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n")
PROMPT = "ROMEO:"


def register_lm(reg: Registry, name: str = "tinylm", seed: int = 0) -> int:
    """A tiny CausalLM with random weights: 2 layers, 32 wide, context 32, vocabulary fitted on CORPUS."""
    torch.manual_seed(seed)
    pre = chars.fit(CORPUS)
    spec = {"name": "transformer", "head": "lm", "vocab_size": pre.vocab_size, "max_len": 32, "d_model": 32,
            "n_layers": 2, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "pad_id": None, "use_sdpa": True}
    model = build_model(spec).eval()
    metrics = {"val_loss": 4.0, "epoch": 0, "note": "random weights (test stand-in)"}
    config = {"name": name, "data": {"source": "corpus"}, "model": {"name": "transformer", "task": "language_model"}}
    return register_model(reg, name, model, spec, pre, metrics, config, meta={"val_loss": metrics["val_loss"]})


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve
    from ray.serve.api import RunTarget

    from modelworks.serve.app import build

    home = tmp_path_factory.mktemp("serve_generate_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELWORKS_HOME", str(home))
        reg = Registry(str(home / "registry"))
        register_lm(reg)
        register_digits(reg, steps=30)
        port = free_port()
        cfg = ServeConfig(max_prompt_chars=MAX_PROMPT, max_new_tokens=MAX_NEW, min_replicas=1, max_replicas=1,
                          alias_poll_s=0)
        t0 = time.perf_counter()
        # Both apps deploy at once (their replicas start in parallel): what runner.start does, for two apps.
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": cfg.request_timeout_s})
        serve.run_many([RunTarget(build("tinylm@latest", reg.uri, cfg), name="tinylm", route_prefix="/"),
                        RunTarget(build("digits@latest", reg.uri, cfg), name="digits", route_prefix="/digits")])
        print(f"apps up in {time.perf_counter() - t0:.1f} s")
    from modelworks.models.generation import generate

    local = reg.load("tinylm@1")[0]

    def sample(prompt: str, n: int, **kw) -> str:
        """What generation.generate gives for the registered checkpoint, in this process (one torch thread:
        with more, a busy 2-core machine runs this 20x slower)."""
        ids = local.preprocessor.encode(prompt).tolist()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return local.preprocessor.decode(list(generate(local.model, ids, n, **kw)))
        finally:
            torch.set_num_threads(threads)

    def greedy(prompt: str, n: int) -> str:
        return sample(prompt, n, temperature=0.0)

    yield {"url": f"http://127.0.0.1:{port}", "reg": reg, "home": home, "local": local, "greedy": greedy,
           "sample": sample, "handle": serve.get_app_handle("tinylm")}
    serve.shutdown()


def post(url, body, **kw):
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(url, data=data.encode(), headers={"Content-Type": "application/json"},
                         timeout=kw.pop("timeout", 60), **kw)


def generate_http(served, **body) -> dict:
    r = post(served["url"] + "/generate", {"prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_greedy_equals_local_and_a_seed_repeats(served):
    out = generate_http(served, max_new_tokens=40, temperature=0)
    assert out["model"] == "tinylm@1" and out["prompt"] == PROMPT
    assert out["tokens"] == 40 and len(out["text"]) == 40
    assert out["text"] == served["greedy"](PROMPT, 40)
    # Past the model's 32-token context: the window slides, the text keeps its length.
    long = generate_http(served, max_new_tokens=100, temperature=0)
    assert long["tokens"] == 100 and long["text"] == served["greedy"](PROMPT, 100)

    a = generate_http(served, max_new_tokens=60, seed=7, top_k=10)
    b = generate_http(served, max_new_tokens=60, seed=7, top_k=10)
    c = generate_http(served, max_new_tokens=60, seed=8, top_k=10)
    assert a["text"] == b["text"] and len(a["text"]) == 60
    assert a["text"] == served["sample"](PROMPT, 60, random_seed=7, top_k=10)  # batched = alone, same seed
    assert c["text"] != a["text"]  # 60 characters from ~40 near-uniform choices: equal only by a miracle
    assert set(a["text"]) <= set(served["local"].preprocessor.chars)
    default = generate_http(served)
    assert default["tokens"] == 200 and len(default["text"]) == 200


def test_streaming_chunks_arrive_as_generated(served):
    n = MAX_NEW
    t0 = time.perf_counter()
    with requests.post(served["url"] + "/generate", json={"prompt": PROMPT, "max_new_tokens": n, "temperature": 0,
                                                          "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert r.headers["x-model"] == "tinylm@1"
        assert "content-length" not in r.headers
        chunks, times = [], []
        for chunk in r.iter_content(chunk_size=None):
            chunks.append(chunk)
            times.append(time.perf_counter() - t0)
    text = b"".join(chunks).decode("utf-8")
    first, last = times[0], times[-1]
    print(f"stream of {n} tokens: {len(chunks)} chunks, first after {first:.3f} s, last after {last:.3f} s")
    assert len(text) == n and text == served["greedy"](PROMPT, n)
    assert len(chunks) >= 10
    assert first < 0.25 * last, (first, last)


def test_client_disconnect_cancels_its_sequence(served):
    handle = served["handle"]
    before = handle.generation_info.remote().result()
    with requests.post(served["url"] + "/generate", json={"prompt": PROMPT, "max_new_tokens": MAX_NEW,
                                                          "stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_content(chunk_size=None))
    # Closing the connection mid-stream: the replica cancels the sequence instead of generating the rest.
    deadline = time.time() + 20
    while True:
        info = handle.generation_info.remote().result()
        if info["active"] == 0:
            break
        assert time.time() < deadline, info
        time.sleep(0.1)
    print("generation_info:", before, "->", info)
    assert info["cancelled"] == before.get("cancelled", 0) + 1, info
    assert info["completed"] == before.get("completed", 0), info


BAD = [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "a" * (MAX_PROMPT + 1)}, "prompt", f"limit {MAX_PROMPT}"),
    ({"prompt": 42}, "prompt", "not a string"),
    ({"max_new_tokens": 5}, "prompt", "missing"),
    ({"prompt": "ROMEO: ¿é 🙂"}, "prompt", "'¿é🙂'"),
    ({"prompt": PROMPT, "max_new_tokens": 0}, "max_new_tokens", "out of range"),
    ({"prompt": PROMPT, "max_new_tokens": MAX_NEW + 1}, "max_new_tokens", "out of range"),
    ({"prompt": PROMPT, "max_new_tokens": "10"}, "max_new_tokens", "not an integer"),
    ({"prompt": PROMPT, "max_new_tokens": 1.5}, "max_new_tokens", "not an integer"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature", "out of range"),
    ({"prompt": PROMPT, "temperature": 3}, "temperature", "out of range"),
    ({"prompt": PROMPT, "temperature": "warm"}, "temperature", "not a number"),
    ({"prompt": PROMPT, "top_k": 0}, "top_k", "out of range"),
    ({"prompt": PROMPT, "top_k": 10_000}, "top_k", "out of range"),
    ({"prompt": PROMPT, "top_k": [3]}, "top_k", "not an integer"),
    ({"prompt": PROMPT, "seed": -1}, "seed", "out of range"),
    ({"prompt": PROMPT, "seed": 1.5}, "seed", "not an integer"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream", "not a boolean"),
    ({"prompt": PROMPT, "steam": True}, "steam", "not a known field"),
    ('{"prompt": "\\ud800"}', "prompt", "vocabulary"),
    ('["ROMEO:"]', "body", "not an object"),
]


@pytest.mark.parametrize("body, field, fragment", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_parameters_are_422_naming_the_field(served, body, field, fragment):
    r = post(served["url"] + "/generate", body)
    assert r.status_code == 422, (r.status_code, r.text)
    err = r.json()
    assert set(err) == {"error", "field", "expected", "status"} and err["status"] == 422
    assert err["field"] == field and err["error"].startswith(field) and fragment in err["error"], err


def test_malformed_bodies_and_wrong_endpoints_are_4xx(served):
    u = served["url"]
    for body in ("", "{", "null"):
        r = post(u + "/generate", body)
        assert 400 <= r.status_code < 500 and r.json()["field"] == "body", r.text
    r = requests.post(u + "/generate", data=b"\xff\xfe", headers={"Content-Type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    # A language model at /predict and v2 infer; a classifier at /generate: one line naming the right endpoint.
    r = post(u + "/predict", {"input": PROMPT})
    assert r.status_code == 400 and "POST /generate" in r.json()["error"], r.text
    v2 = {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}]}
    r = post(u + "/v2/models/tinylm/infer", v2)
    assert r.status_code == 400 and "POST /generate" in r.json()["error"], r.text
    r = post(u + "/digits/generate", {"prompt": PROMPT})
    assert r.status_code == 400 and "POST /predict" in r.json()["error"] and "digits@1" in r.json()["error"], r.text
    assert "\n" not in r.json()["error"]
    assert post(u + "/digits/predict", {"input": [0.0] * 64}).status_code == 200
    meta = requests.get(u + "/v2/models/tinylm", timeout=30).json()
    assert meta["parameters"]["endpoint"] == "POST /generate"


def test_openapi_declares_generate(served):
    spec = requests.get(served["url"] + "/openapi.json", timeout=30).json()
    op = spec["paths"]["/generate"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]  # to components: it resolves
    schema = spec["components"]["schemas"][ref.rpartition("/")[2]]
    assert {"prompt", "max_new_tokens", "temperature", "top_k", "seed", "stream"} <= set(schema["properties"])
    assert {"200", "400", "422", "503"} <= set(op["responses"])
    assert "text/plain" in op["responses"]["200"]["content"]


def test_sixteen_concurrent_generations_share_the_replica(served):
    from modelworks.serve.app import deployment_options

    assert deployment_options(ServeConfig(), "m", "/r")["max_ongoing_requests"] >= 16
    n = 150
    generate_http(served, max_new_tokens=n, seed=0)  # warm
    alone = []
    for _ in range(3):  # the median of three: one ~0.1 s request is at the mercy of a single scheduler hiccup
        t0 = time.perf_counter()
        generate_http(served, max_new_tokens=n, seed=0)
        alone.append(time.perf_counter() - t0)
    one = sorted(alone)[1]
    before = served["handle"].generation_info.remote().result()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda i: generate_http(served, max_new_tokens=n, seed=i), range(16)))
    many = time.perf_counter() - t0
    info = served["handle"].generation_info.remote().result()
    print(f"one request of {n} tokens: {one:.3f} s; 16 concurrent: {many:.3f} s ({many / one:.1f}x); "
          f"most sequences in one step: {info['max_active']}; steps for the 16: {info['steps'] - before['steps']}")
    assert [o["tokens"] for o in outs] == [n] * 16
    assert len({o["text"] for o in outs}) == 16  # each request got its own sequence back
    assert many < 8 * one
    assert info["max_active"] >= 8


def test_cli_generate_prints_prompt_then_the_sample(served, capsys):
    from modelworks.cli import main

    reg = served["reg"].uri
    # The real command in its own process: the prompt, then the sample (streamed to stdout as generated).
    env = {**os.environ, "MODELWORKS_HOME": str(served["home"])}
    t0 = time.perf_counter()
    # It must not import Ray: sampling from a checkpoint needs none of it (and Ray's import costs seconds).
    code = ("import sys; from modelworks.cli import main; rc = main(sys.argv[1:]); "
            "print('\\nray imported' if 'ray' in sys.modules else '', end=''); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "generate", "tinylm@latest", "--registry", reg,
                        "--prompt", PROMPT, "--max-new-tokens", "50", "--temperature", "0"], env=env,
                       capture_output=True, text=True, timeout=120)
    print(f"modelworks generate (a new process): {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPT + served["greedy"](PROMPT, 50) + "\n"

    # The same handler in this process: seeds, and errors as one line (exit 2).
    capsys.readouterr()
    threads = torch.get_num_threads()  # the handler sets 1 for its process
    seeded = ["generate", "tinylm@1", "--registry", reg, "--prompt", PROMPT, "--max-new-tokens", "30", "--seed", "3",
              "--top-k", "5"]
    assert main(seeded) == 0
    out = capsys.readouterr().out
    assert out == PROMPT + served["sample"](PROMPT, 30, random_seed=3, top_k=5) + "\n"
    for args, fragment in ((["tinylm", "--prompt", PROMPT, "--top-k", "0"], "--top-k"),
                           (["tinylm", "--prompt", "ROMEO: é"], "'é'"),
                           (["tinylm", "--prompt", PROMPT, "--temperature", "3"], "--temperature"),
                           (["tinylm", "--prompt", PROMPT, "--max-new-tokens", "0"], "--max-new-tokens"),
                           (["digits", "--prompt", "x"], "not a language model"),
                           (["nosuchmodel", "--prompt", "x"], "nosuchmodel")):
        assert main(["generate", *args, "--registry", reg]) == 2, args
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert captured.out == "" and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], \
            captured.err
    torch.set_num_threads(threads)
