"""Open Inference Protocol v2 as the standard clients speak it, over real HTTP on a real local Ray (no mocks).

One app for the module: `digits@latest` on a free port. The client is Triton's own Python HTTP client
(tritonclient[http]): it sends no Content-Type, and by default puts tensors in the binary tensor data form
(JSON header + raw bytes, split by Inference-Header-Content-Length). Its answers must equal /predict's.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from modelworks.config import ServeConfig
from modelworks.serve.testing import digits_data, register_digits
from tests.conftest import serve_fresh_registry

pytestmark = pytest.mark.ray
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_BODY = 64 * 1024
N = 6


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve

    cfg = ServeConfig(max_inputs=16, max_body_bytes=MAX_BODY, min_replicas=1, max_replicas=1, alias_poll_s=0)
    _, _, url = serve_fresh_registry(tmp_path_factory, "serve_v2_home",
                                     lambda reg: register_digits(reg, random_seed=0, steps=200), "digits@latest", cfg)
    x, _ = digits_data()
    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"), network_timeout=60.0)
    yield {"url": url, "client": client, "x": x[:N].astype(np.float32)}
    client.close()
    serve.shutdown()


@pytest.fixture(scope="module")
def predicted(served):
    """What /predict answers for the same images: (probabilities (N, 10), labels)."""
    r = requests.post(served["url"] + "/predict", json={"inputs": served["x"].tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    probs = np.array([[p["probabilities"][str(k)] for k in range(10)] for p in preds], np.float32)
    return probs, [p["label"] for p in preds]


def test_server_and_model_metadata(served):
    client = served["client"]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    server = client.get_server_metadata()
    assert server["name"] == "modelworks" and isinstance(server["version"], str) and server["version"]
    assert "binary_tensor_data" in server["extensions"]
    assert requests.get(served["url"] + "/v2", timeout=30).json() == server
    meta = client.get_model_metadata("digits")
    assert meta["name"] == "digits" and meta["versions"] == ["1"] and meta["platform"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                               {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    assert client.get_model_metadata("digits", model_version="1") == meta


@pytest.mark.parametrize("binary_in", [True, False], ids=["in=binary", "in=json"])
@pytest.mark.parametrize("binary_out", [True, False, None], ids=["out=binary", "out=json", "out=default"])
def test_triton_client_matches_predict(served, predicted, binary_in, binary_out):
    client, x = served["client"], served["x"]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outputs = None  # the client then asks for every output as binary data (parameters.binary_data_output)
    if binary_out is not None:
        outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary_out),
                   httpclient.InferRequestedOutput("label", binary_data=binary_out)]
    result = client.infer("digits", [inp], outputs=outputs, request_id="req-1")
    response = result.get_response()
    assert response["model_name"] == "digits" and response["model_version"] == "1" and response["id"] == "req-1"
    sent_binary = binary_out is not False
    for out in response["outputs"]:
        assert ("binary_data_size" in (out.get("parameters") or {})) == sent_binary, out
        assert ("data" in out) != sent_binary, out
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (N, 10)
    want_probs, want_labels = predicted
    assert np.allclose(probs, want_probs, atol=1e-6)
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").tolist()]
    assert labels == want_labels


def test_triton_client_one_binary_output(served, predicted):
    """Mixed: probabilities as binary data, the label as JSON, in one response."""
    x = served["x"][:2]
    inp = httpclient.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(x.reshape(2, 64))
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=True),
               httpclient.InferRequestedOutput("label", binary_data=False)]
    result = served["client"].infer("digits", [inp], outputs=outputs)
    assert np.allclose(result.as_numpy("probabilities"), predicted[0][:2], atol=1e-6)
    assert result.get_output("label")["data"] == predicted[1][:2]


def test_raw_request_without_content_type(served, predicted):
    u, x = served["url"], served["x"]
    body = {"inputs": [{"name": "input", "shape": [N, 8, 8], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    r = requests.post(u + "/v2/models/digits/infer", data=json.dumps(body).encode(), timeout=30)
    assert "Content-Type" not in r.request.headers
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and "Inference-Header-Content-Length" not in r.headers
    probs = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")
    assert np.allclose(np.array(probs["data"]).reshape(N, 10), predicted[0], atol=1e-6)
    r = requests.post(u + "/predict", data=json.dumps({"inputs": x.tolist()}).encode(), timeout=30)
    assert "Content-Type" not in r.request.headers and r.status_code == 200, r.text
    # binary tensor data by hand: application/octet-stream, header length, binary outputs back
    head = json.dumps({"inputs": [{"name": "input", "shape": [N, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    r = requests.post(u + "/v2/models/digits/infer", data=head + x.astype("<f4").tobytes(), timeout=30,
                      headers={"Content-Type": "application/octet-stream",
                               "Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["Inference-Header-Content-Length"])
    out = json.loads(r.content[:n])["outputs"]
    assert [o["parameters"]["binary_data_size"] for o in out][0] == N * 10 * 4
    assert np.allclose(np.frombuffer(r.content[n:n + N * 40], "<f4").reshape(N, 10), predicted[0], atol=1e-6)


def error_body(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["status"] == status and body["field"] and body["expected"] and body["error"], body
    return body


def test_binary_size_mismatch_is_400_naming_the_input(served):
    u, x = served["url"], served["x"]
    url = u + "/v2/models/digits/infer"
    data = x[:1].astype("<f4").tobytes()  # 256 bytes

    def send(size, shape=(1, 8, 8), blob=data, **headers):
        head = json.dumps({"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": size}}]}).encode()
        return requests.post(url, data=head + blob, timeout=30,
                             headers={"Inference-Header-Content-Length": str(len(head)), **headers})

    assert send(256).status_code == 200                                      # the control: a correct body
    field = "inputs[0].parameters.binary_data_size"
    for r in (send(100), send(512), send(256, shape=(2, 8, 8)), send(256, blob=data[:-4])):
        body = error_body(r, 400)
        assert body["field"] == field and "'input'" in body["error"], body
    body = error_body(send(256, **{"Inference-Header-Content-Length": "99999"}), 400)
    assert body["field"] == "Inference-Header-Content-Length"
    assert error_body(send(256, **{"Content-Type": "text/plain"}), 415)["field"] == "Content-Type"
    big = np.zeros((300, 64), "<f4").tobytes()                               # over max_body_bytes
    assert len(big) > MAX_BODY
    assert error_body(send(len(big), shape=(300, 64), blob=big), 413)["field"] == "body"
    r = requests.post(u + "/predict", data=b'{"input": [0]}', timeout=30,
                      headers={"Inference-Header-Content-Length": "5"})  # /predict has no binary form
    assert error_body(r, 400)["field"] == "Inference-Header-Content-Length"

    # the standard client: a tensor whose bytes do not cover its declared shape
    inp = httpclient.InferInput("input", [1, 8, 8], "FP32")
    inp.set_data_from_numpy(x[:1], binary_data=True)
    inp.set_shape([2, 8, 8])
    with pytest.raises(InferenceServerException) as info:
        served["client"].infer("digits", [inp])
    assert info.value.status() == "400" and field in info.value.message() and "'input'" in info.value.message()
    # ...and the server still answers
    inp.set_shape([1, 8, 8])
    assert served["client"].infer("digits", [inp]).as_numpy("probabilities").shape == (1, 10)
