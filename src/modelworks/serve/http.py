"""The Serve app's HTTP layer, without Ray: the FastAPI ``api`` that app.py's ModelServer routes hang on, its
errors in the app's one JSON shape ``{error, field, expected, status}``, and reading a request body.
"""

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelworks.serve.schemas import InputError
from modelworks.serve.v2_schemas import V2_HEADER_LENGTH, check_content_type, split_body


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
                "under /v2; a language model: POST /generate. Errors are JSON: {error, field, expected, status}.",
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


def openapi_body(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


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
