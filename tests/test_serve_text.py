"""A text model (the tiny Transformer sentiment classifier) served over real HTTP on a real local Ray.

One app for the module: `sentiment@latest` on a free port, with small limits (8 texts, 200 characters) so that
the limit tests send small bodies.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from modelworks.config import ServeConfig
from modelworks.serve.testing import register_text
from tests.conftest import serve_fresh_registry

pytestmark = pytest.mark.ray

MAX_INPUTS, MAX_CHARS = 8, 200
POSITIVE, NEGATIVE = "a gorgeous, witty film", "the story is dull and tedious from start to end"


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve

    # A 20 ms batch window: the concurrent-requests test gets real multi-request batches.
    cfg = ServeConfig(max_inputs=MAX_INPUTS, max_text_chars=MAX_CHARS, batch_wait_timeout_s=0.02,
                      min_replicas=1, max_replicas=1, alias_poll_s=0)
    reg, _, url = serve_fresh_registry(tmp_path_factory, "serve_text_home", register_text, "sentiment@latest", cfg)
    yield {"url": url, "local": reg.load("sentiment@1")[0]}
    serve.shutdown()


def post(url, body):
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(url, data=data.encode(), headers={"Content-Type": "application/json"}, timeout=30)


def local_probs(served, texts: list[str]) -> np.ndarray:
    """What the checkpoint answers in-process, one text at a time (no padding at all)."""
    return np.stack([served["local"].predict_proba([t]).numpy()[0] for t in texts])


def test_predict_one_sentence_and_a_list(served):
    u = served["url"]
    r = post(u + "/predict", {"input": POSITIVE})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "sentiment" and body["model_version"] == 1
    pred = body["predictions"][0]
    assert pred["label"] == "positive" and pred["label_index"] == 1 and pred["model_version"] == 1
    assert set(pred["probabilities"]) == {"negative", "positive"}
    assert np.allclose([pred["probabilities"][c] for c in ("negative", "positive")],
                       local_probs(served, [POSITIVE])[0], atol=1e-5)

    texts = [POSITIVE, NEGATIVE, "a charming film", "boring"]  # different lengths: padded to the longest
    r = post(u + "/predict", {"inputs": texts})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == ["positive", "negative", "positive", "negative"]
    got = np.array([[p["probabilities"][c] for c in ("negative", "positive")] for p in preds])
    assert np.allclose(got, local_probs(served, texts), atol=1e-5)  # padding does not change an answer


def test_concurrent_requests_share_batches_and_keep_their_answers(served):
    texts = [POSITIVE, NEGATIVE, "awful", "a delightful and touching film from start to end"] * 4
    with ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(lambda t: post(served["url"] + "/predict", {"input": t}), texts))
    assert [r.status_code for r in responses] == [200] * len(texts)
    got = np.array([[r.json()["predictions"][0]["probabilities"][c] for c in ("negative", "positive")]
                    for r in responses])
    assert np.allclose(got, local_probs(served, texts), atol=1e-5)


def test_v2_metadata_and_bytes_infer(served):
    u = served["url"]
    meta = requests.get(u + "/v2/models/sentiment").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "BYTES", "shape": [-1]}]
    assert meta["parameters"]["class_names"] == ["negative", "positive"]
    texts = [POSITIVE, NEGATIVE]
    for shape, data in (([2], texts), ([2, 1], [[t] for t in texts])):
        body = {"id": "t1", "inputs": [{"name": "input", "shape": shape, "datatype": "BYTES", "data": data}]}
        r = post(u + "/v2/models/sentiment/infer", body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model_name"] == "sentiment" and out["model_version"] == "1" and out["id"] == "t1"
        probs = next(o for o in out["outputs"] if o["name"] == "probabilities")
        assert probs["datatype"] == "FP32" and probs["shape"] == [2, 2]
        assert np.allclose(np.array(probs["data"]).reshape(2, 2), local_probs(served, texts), atol=1e-5)
        labels = next(o for o in out["outputs"] if o["name"] == "label")
        assert labels == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["positive", "negative"]}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_client_bytes_tensor(served, binary):
    """Triton's HTTP client sends text as a BYTES tensor (binary: 4-byte length-prefixed strings), with no
    Content-Type; the answers equal /predict's."""
    httpclient = pytest.importorskip("tritonclient.http")

    texts = [POSITIVE, NEGATIVE, "ünïcode 🙂 film"]
    r = post(served["url"] + "/predict", {"inputs": texts})
    assert r.status_code == 200, r.text
    want = np.array([[p["probabilities"][c] for c in ("negative", "positive")] for p in r.json()["predictions"]])
    client = httpclient.InferenceServerClient(url=served["url"].removeprefix("http://"), network_timeout=60.0)
    try:
        inp = httpclient.InferInput("input", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
        result = client.infer("sentiment", [inp], outputs=outputs)
    finally:
        client.close()
    assert np.allclose(result.as_numpy("probabilities"), want, atol=1e-6)
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").tolist()]
    assert labels == [p["label"] for p in r.json()["predictions"]]


def v2_body(data, shape=None, datatype="BYTES"):
    shape = shape if shape is not None else [len(data)]
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize("path, body, field, fragment", [
    ("/predict", {"input": 5}, "input", "not a string"),
    ("/predict", {"inputs": ["a film", None]}, "inputs[1]", "null"),
    ("/predict", {"input": [0.0] * 64}, "input", "not a string"),
    ("/predict", {"input": ""}, "input", "empty"),
    ("/predict", {"input": " \n\t "}, "input", "whitespace"),
    ("/predict", {"input": "x" * (MAX_CHARS + 1)}, "input", f"limit {MAX_CHARS}"),
    ("/predict", {"inputs": ["a film", "x" * (MAX_CHARS + 1)]}, "inputs[1]", f"limit {MAX_CHARS}"),
    ("/predict", {"inputs": ["a film"] * (MAX_INPUTS + 1)}, "inputs", f"limit {MAX_INPUTS}"),
    ("/predict", '{"input": "\\ud800"}', "input", "surrogate"),
    ("/v2/models/sentiment/infer", v2_body([[0.0] * 64], [1, 64], "FP32"), "inputs[0].datatype", "FP32"),
    ("/v2/models/sentiment/infer", v2_body([3]), "inputs[0].data[0]", "not a string"),
    ("/v2/models/sentiment/infer", v2_body(["a film", ""]), "inputs[0].data[1]", "empty"),
    ("/v2/models/sentiment/infer", v2_body(["x" * (MAX_CHARS + 1)]), "inputs[0].data[0]", f"limit {MAX_CHARS}"),
    ("/v2/models/sentiment/infer", v2_body(["a film"] * (MAX_INPUTS + 1)), "inputs[0].shape", f"limit {MAX_INPUTS}"),
    ("/v2/models/sentiment/infer", v2_body(["a film"], [2]), "inputs[0].data", "needs 2"),
])
def test_bad_text_input_is_4xx_naming_the_field(served, path, body, field, fragment):
    r = post(served["url"] + path, body)
    assert r.status_code == 422, (r.status_code, r.text)
    err = r.json()
    assert err["field"] == field and field in err["error"] and fragment in err["error"], err


def test_odd_but_valid_texts_are_answered(served):
    """Whatever Unicode a client sends within the limits reaches the tokenizer without a server error."""
    odd = ["\x00", "🙂🙂🙂", "日本語のテキスト", "\u200b", "<script>alert(1)</script>", "ñandú " * 30,
           "x" * MAX_CHARS]
    r = post(served["url"] + "/predict", {"inputs": odd})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == len(odd)
