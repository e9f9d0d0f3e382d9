"""The served OpenAPI document (/openapi.json), checked and fuzzed over real HTTP on a real local Ray (no mocks).

One app for the module: `digits@latest` on a free port, with small limits so that a fuzzer's bodies can reach them
(413, a batch over max_inputs). schemathesis generates requests from the live document, valid and invalid, and
every answer must be no 5xx, a status the document declares for that route, and a body matching its schema.
"""
from __future__ import annotations

import copy
import time

import pytest
import requests
import schemathesis

from modelworks.config import ServeConfig
from modelworks.serve.testing import register_digits
from tests.conftest import serve_fresh_registry

pytestmark = pytest.mark.ray

MAX_BODY = 16 * 1024


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve

    cfg = ServeConfig(max_inputs=8, max_body_bytes=MAX_BODY, min_replicas=1, max_replicas=1, alias_poll_s=0)
    _, _, url = serve_fresh_registry(tmp_path_factory, "serve_openapi_home",
                                     lambda reg: register_digits(reg, random_seed=0, steps=20), "digits@latest", cfg)
    yield {"url": url, "doc": requests.get(url + "/openapi.json", timeout=30).json()}
    serve.shutdown()


def refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_document_declares_errors_and_bodies(served):
    doc = served["doc"]
    schemas = doc["components"]["schemas"]
    assert {r for r in refs(doc) if r.rpartition("/")[2] not in schemas} == set()  # every $ref resolves
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            codes = {int(c) for c in op["responses"]}
            assert 200 in codes and 503 in codes, (method, path, codes)  # 503: Serve sheds load on every route
            for code, response in op["responses"].items():
                content = response.get("content", {})
                if int(code) >= 400 and code != "408":
                    assert content["application/json"]["schema"] == error, (method, path, code)  # ONE error shape
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]["schema"]
                assert body["$ref"].rpartition("/")[2] in schemas, (path, body)

    def responses(path: str, method: str = "post") -> set[int]:
        return {int(c) for c in doc["paths"][path][method]["responses"]}

    assert responses("/predict") == {200, 400, 408, 413, 415, 422, 503}
    assert responses("/v2/models/{name}/infer") == {200, 400, 404, 408, 413, 415, 422, 503}
    assert responses("/v2/models/{name}/versions/{version}/infer") == responses("/v2/models/{name}/infer")
    assert responses("/v2/models/{name}", "get") == {200, 404, 503}
    assert responses("/healthz", "get") == {200, 503}
    assert "HTTPValidationError" not in schemas  # FastAPI's own 422 body: never what this app answers


def validate(case, url: str, session: requests.Session | None = None) -> int:
    """Send ``case`` and check the answer: no 5xx, a status the document declares, a body matching its schema.
    Returns the status; raises AssertionError, one line per problem, naming the request."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    try:
        return case.call_and_validate(base_url=url, session=session, checks=checks, timeout=30).status_code
    except schemathesis.errors.FailureGroup as group:
        problems = "; ".join(f"{f.title}: {' '.join(f.message.split())[:300]}" for f in group.exceptions)
        raise AssertionError(f"{case.method} {case.formatted_path} ({case.media_type}): {problems}") from None


def fuzz(schema, url: str, max_examples: int, served_model: dict[str, str]) -> tuple[list[str], dict[int, int]]:
    """Send schemathesis's generated requests, valid then invalid, to every operation of ``schema`` through
    validate(). An operation with path parameters is fuzzed twice: with generated ones (almost always an unknown
    model: 404) and with ``served_model``'s (so that its body reaches the model's own checks). Returns (the first
    problem of each failing operation and mode, how often each status was answered)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    session = requests.Session()
    failures, seen = [], {}
    for result in schema.get_all_operations():
        op = result.ok()
        names = [None]
        if served_model and "{" in op.path:
            names.append({k: v for k, v in served_model.items() if "{" + k + "}" in op.path})
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            for path_parameters in names:
                # Generation only, the same examples every run; no shrinking: a problem is reported as found.
                @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode, path_parameters=path_parameters))
                def run(case):
                    status = validate(case, url, session)
                    seen[status] = seen.get(status, 0) + 1

                try:
                    run()
                except Unsatisfiable:  # nothing to make invalid (no body; only str path parameters, or fixed ones)
                    assert mode == schemathesis.GenerationMode.NEGATIVE, op.label
                except Exception as err:  # noqa: BLE001 - a failed check, or hypothesis's report of one
                    failures.append(f"{op.label} ({mode.value}): {err}")
    return failures, seen


SERVED = {"name": "digits", "version": "1"}
# Requests a generator seldom makes (its bodies are JSON, a few hundred bytes), checked the same way.
EDGE_CASES = {
    "a body over max_body_bytes": ({"body": {"inputs": [[0.0] * 64] * 300}}, 413),
    "a text/plain body": ({"body": "one image, please", "media_type": "text/plain"}, 415),
    "a malformed Inference-Header-Content-Length": (
        {"body": {"inputs": []}, "headers": {"Inference-Header-Content-Length": "x"}}, 400),
}


def test_fuzz_the_served_document(served):
    """schemathesis, driven by the live /openapi.json, for a bounded number of examples per route and mode."""
    t0 = time.perf_counter()
    schema = schemathesis.openapi.from_url(served["url"] + "/openapi.json")
    failures, seen = fuzz(schema, served["url"], max_examples=10, served_model=SERVED)
    for path in ("/predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        for what, (kwargs, status) in EDGE_CASES.items():
            case = schema[path]["POST"].Case(path_parameters={k: v for k, v in SERVED.items() if k in path},
                                             **kwargs)
            try:
                got = validate(case, served["url"])
                assert got == status, f"answered {got}, not {status}"
            except AssertionError as err:
                failures.append(f"POST {path}, {what}: {err}")
    print(f"fuzzed in {time.perf_counter() - t0:.1f}s: {dict(sorted(seen.items()))}")
    assert not failures, "\n".join(failures)
    assert {200, 400, 404, 422} <= set(seen), seen  # the generator reached real answers and real errors


def test_fuzzer_fails_on_an_undocumented_status(served):
    """The check above can fail: the same fuzzer, given the document without GET /v2/models/{name}'s 404, reports
    the 404 it gets for an unknown name."""
    doc = copy.deepcopy(served["doc"])
    doc["paths"] = {"/v2/models/{name}": doc["paths"]["/v2/models/{name}"]}
    del doc["paths"]["/v2/models/{name}"]["get"]["responses"]["404"]
    failures, _ = fuzz(schemathesis.openapi.from_dict(doc), served["url"], max_examples=3, served_model={})
    assert len(failures) == 1 and "Undocumented status code" in failures[0] and "Received: 404" in failures[0], \
        failures
