"""The Serve app's HTTP layer, without Ray: the FastAPI ``api`` that app.py's ModelServer routes hang on, its
errors in the app's one JSON shape ``{error, field, expected, status}`` (``schemas.ErrorResponse``), the OpenAPI
document's request bodies and error responses, and reading a request body.
"""

import functools
import json
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelworks.serve.schemas import ErrorResponse, InputError
from modelworks.serve.v2_schemas import V2_HEADER_LENGTH, V2InferResponse, check_content_type, split_body


def json_response(content: Any, status: int = 200) -> Response:
    return Response(json.dumps(content, separators=(",", ":")), status_code=status, media_type="application/json")


def error_response(err: InputError) -> Response:
    return json_response(err.to_dict(), err.status)


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelworks")
    except PackageNotFoundError:
        return "0"


api = FastAPI(
    title="modelworks",
    description="A registered model served by Ray Serve. POST /predict, or the Open Inference Protocol (v2) "
                "under /v2; a language model: POST /generate. Errors are JSON: {error, field, expected, status} "
                "(ErrorResponse), except Ray Serve's own 408 and 503 answers (text/plain).",
    version="1",
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    field = "path" if exc.status_code == 404 else "method"
    expected = ("one of /predict, /generate, /healthz, /readyz, /docs, /v2/health/live, /v2/health/ready, "
                "/v2/models/{name}, /v2/models/{name}/ready, /v2/models/{name}/infer") \
        if exc.status_code == 404 else "see /docs"
    return json_response({"error": f"{field}: {exc.detail}; expected {expected}", "field": field,
                          "expected": expected, "status": exc.status_code}, exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(p) for p in first.get("loc", ())) or "request"
    return json_response({"error": f"{field}: {first.get('msg', 'invalid')}", "field": field, "expected": "see /docs",
                          "status": 422}, 422)


# -- the OpenAPI document (/openapi.json, /docs) -----------------------------------------------------------
REF = "#/components/schemas/"

# What each error status means, the same on every route that answers it. The body is ErrorResponse, except
# where Ray Serve answers by itself before the app sees the request: text/plain (see error_responses).
ERROR_MEANINGS = {
    400: "the body is empty or not JSON, its binary tensor data do not match their declared sizes, a header is "
         "malformed, or the served model is of the other kind (a language model at /predict or infer, a "
         "classifier at /generate)",
    404: "no model of that name (or version) is served here",
    408: "Ray Serve's own answer (text/plain) when a request takes longer than serve.request_timeout_s",
    413: "the body is larger than serve.max_body_bytes",
    415: "the Content-Type is not application/json (infer also takes application/octet-stream)",
    422: "the body is JSON but not a valid request for the served model; `field` names the first problem",
    500: "the model failed while generating",
    503: "the model is not loaded yet or the request timed out in the model (JSON), or Ray Serve shed the request "
         "because its queue is full (text/plain)",
}
SERVE_TEXT = {"text/plain": {"schema": {"type": "string"}}}  # a body Ray Serve writes itself


def error_responses(*codes: int) -> dict[int, dict]:
    """FastAPI ``responses=`` entries for the error statuses a route can answer, each with its meaning and the
    app's one error body, ErrorResponse (408 comes only from Ray Serve, 503 from either)."""
    out: dict[int, dict] = {}
    for code in codes:
        out[code] = {"description": ERROR_MEANINGS[code]}
        if code != 408:
            out[code]["model"] = ErrorResponse
        if code in (408, 503):
            out[code]["content"] = SERVE_TEXT
    return out


# The two infer routes (with a version and without) answer alike.
V2_INFER_RESPONSES = {
    200: {"model": V2InferResponse,
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "description": "JSON; with outputs asked for as binary data, application/octet-stream: the JSON header "
                         "(Inference-Header-Content-Length bytes), then the tensors' bytes"},
    **error_responses(400, 404, 408, 413, 415, 422, 503)}

# The request bodies openapi_body declared, for openapi(). Kept on the app, not in this module: Ray Serve serves a
# copy of the app (pickled with the deployment), and a replica need not import the module that declared them.
api.state.body_models = {}


def openapi_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` declaring a route's JSON request body. The routes read their bodies themselves (read_body:
    size limit, binary tensor data, the app's own errors), so FastAPI does not know the model: it is declared here
    by reference, and openapi() adds it to the document's components."""
    api.state.body_models[model.__name__] = model
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": REF + model.__name__}}}}}


def openapi(app: FastAPI) -> dict:
    """``app``'s FastAPI document, completed: the request body models (and the models they use) in components, so
    every $ref resolves; and without the 422 FastAPI adds to each route with a path parameter. That 422 would
    promise FastAPI's own validation body, which this app never answers: a str path parameter cannot fail, and a
    validation error is ErrorResponse anyway (_validation_error)."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        _, defs = models_json_schema([(m, "validation") for m in app.state.body_models.values()],
                                     ref_template=REF + "{model}")
        for name, schema in defs.get("$defs", {}).items():
            components.setdefault(name, schema)  # a model also in a response (V2Tensor) is there already
        fastapi_422 = {"$ref": REF + "HTTPValidationError"}
        for operations in doc["paths"].values():
            for op in operations.values():
                json_422 = op["responses"].get("422", {}).get("content", {}).get("application/json", {})
                if json_422.get("schema") == fastapi_422:
                    del op["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


# FastAPI's documented way to replace the document (it is built once, on first use). Bound to the app object itself:
# the copy Ray Serve serves then documents its own routes, not those of this module's `api` in the replica.
api.openapi = functools.partial(openapi, api)


# -- the shapes of the small answers: documentation only (the routes write their JSON themselves) --------------
class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    model: str
    model_version: int
    ref: str = Field(..., description="what the server was asked to serve: name, name@version or name@alias")
    last_error: str | None = Field(..., description="the last failed model load, if any (the served model stays)")


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(..., description="-1: any size (the batch)")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2MetadataTensor]
    outputs: list[V2MetadataTensor]
    parameters: dict[str, Any] = Field(..., description="class_names; a table model's feature_names and "
                                                        "categorical_columns; a language model's endpoint")


async def read_body(request: Request, limit: int, binary_ok: bool = False) -> tuple[Any, bytes, bytes]:
    """(parsed JSON, its text, binary tensor data after it: only with Inference-Header-Content-Length) of a body
    of at most ``limit`` bytes."""
    header_len = check_content_type(request.headers.get("content-type"), request.headers.get(V2_HEADER_LENGTH),
                                    binary_ok)
    expected = f"a body of at most {limit} bytes"
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise InputError(413, "body", f"is {int(length)} bytes", expected)
        except ValueError:
            raise InputError(400, "Content-Length", f"is {length!r}", "an integer") from None
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise InputError(413, "body", f"exceeds {limit} bytes", expected)
    text, binary = split_body(bytes(buf), header_len)
    if not text:
        raise InputError(400, "body", "is empty", "a JSON object (see /docs)")
    try:
        return json.loads(text), text, binary
    except (ValueError, RecursionError) as err:
        raise InputError(400, "body", f"is not valid JSON ({type(err).__name__})", "a JSON object (see /docs)") \
            from None
