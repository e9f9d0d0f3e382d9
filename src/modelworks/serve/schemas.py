"""Request/response models and input validation for the Serve app. Pure functions: no Ray, no HTTP.

Everything a client sends is checked here before it can reach the model. A problem raises
``InputError(status, field, message, expected)``; the app turns it into
``{"error": "<field>: <message>", "field": ..., "expected": ..., "status": ...}`` with that status code.

/predict body (one of):
    {"input": X}                 one input
    {"inputs": [X, X, ...]}      a batch of 1..max_inputs inputs
where X, for a model with input_shape [H, W], is H*W numbers, an H x W nested list, or a base64 PNG string
(grayscale, exactly W x H pixels, optionally prefixed "data:image/png;base64,"); for a text model X is a
string (non-empty, at most serve.max_text_chars characters); for a table model X is {"column": value, ...}
with exactly the model's feature columns (null = missing, imputed as in training), or the values in the
model's column order.

/v2/models/{name}/infer body (Open Inference Protocol, REST):
    {"id": "...", "inputs": [{"name": "input", "shape": [N, H, W] | [N, H*W], "datatype": "FP32",
      "data": [...flat or nested, row-major...]}], "outputs": [{"name": "probabilities"}, {"name": "label"}]}
    a text model takes {"name": "input", "shape": [N] | [N, 1], "datatype": "BYTES", "data": ["text", ...]}
    a table model with numeric columns only takes shape [N, columns]; a regression model answers with the
    output "value" (FP32, [N, 1]) instead of probabilities and label

Binary tensor data extension (Triton / KServe): with an ``Inference-Header-Content-Length: L`` header the first L
bytes of the body are the JSON above and the rest is raw tensor data. An input sent that way carries
``"parameters": {"binary_data_size": B}`` instead of ``data``: B little-endian bytes, row-major (BYTES: each element
a 4-byte little-endian length and the UTF-8 text). B must be exactly shape x datatype size (else 400). Outputs
come back as binary data when asked for (``outputs[i].parameters.binary_data``, or request-level
``parameters.binary_data_output``): see ``v2_response``. A body without a Content-Type is read as JSON (what
Triton's and KServe's clients send).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

MAX_ABS = 1e6                 # inputs are pixels/features: anything larger is a client error, not a model input
PNG_PREFIX = "data:image/png;base64,"
MAX_PNG_CHARS = 256 * 1024    # base64 text per image (a 28x28 grayscale PNG is < 1 KiB)
V2_DATATYPES = {
    "FP16": "f", "FP32": "f", "FP64": "f",
    "INT8": "i", "INT16": "i", "INT32": "i", "INT64": "i",
    "UINT8": "u", "UINT16": "u", "UINT32": "u", "UINT64": "u",
}
_INT_RANGES = {"INT8": (-128, 127), "INT16": (-(1 << 15), (1 << 15) - 1), "INT32": (-(1 << 31), (1 << 31) - 1),
               "INT64": (-(1 << 63), (1 << 63) - 1), "UINT8": (0, 255), "UINT16": (0, (1 << 16) - 1),
               "UINT32": (0, (1 << 32) - 1), "UINT64": (0, (1 << 64) - 1)}
V2_OUTPUTS = ("probabilities", "label")
V2_REGRESSION_OUTPUTS = ("value",)
TABLE_MAX_ABS = 1e30          # table features are in their own units (prices, counts): only float32 overflow is refused
V2_HEADER_LENGTH = "Inference-Header-Content-Length"
# Binary tensor data: little-endian, native size of each datatype.
V2_NUMPY = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
            "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}


class InputError(Exception):
    """A client error: the HTTP status, the offending field, what was wrong and what is expected."""

    def __init__(self, status: int, field: str, message: str, expected: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message, self.expected = status, field, message, expected

    def to_dict(self) -> dict:
        return {"error": f"{self.field}: {self.message}; expected {self.expected}", "field": self.field,
                "expected": self.expected, "status": self.status}


@dataclass(frozen=True)
class InputSpec:
    """What one input must look like, taken from the served model's preprocessor."""
    input_shape: tuple[int, ...]
    max_inputs: int
    pixel_scale: float = 1.0      # PNG pixels are 0..255; digits were trained on 0..16

    @cached_property  # both are read on every request: computed once per served model
    def dim(self) -> int:
        return int(np.prod(self.input_shape))

    @cached_property
    def description(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        forms = f"{self.dim} numbers"
        if len(self.input_shape) > 1:
            forms += f", a {shape} nested list of numbers"
        if len(self.input_shape) == 2:
            forms += f", or a base64 PNG ({self.input_shape[1]}x{self.input_shape[0]} pixels, grayscale)"
        return forms + f" (finite, |x| <= {MAX_ABS:g})"


@dataclass(frozen=True)
class TextSpec:
    """What one input of a text model must be: a string the checkpoint's own tokenizer reads."""
    max_inputs: int
    max_chars: int

    @cached_property
    def description(self) -> str:
        return f"a non-empty string of at most {self.max_chars} characters"


@dataclass(frozen=True)
class TableSpec:
    """What one input of a table model must be: its feature columns by name (or their values in order)."""
    columns: tuple[tuple[str, str], ...]   # (name, numeric|categorical), in the model's order
    max_inputs: int
    regression: bool = False

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @cached_property
    def categorical(self) -> tuple[str, ...]:
        return tuple(name for name, role in self.columns if role == "categorical")

    @cached_property
    def description(self) -> str:
        shown = ", ".join(f"{n} ({'text' if r == 'categorical' else 'number'})" for n, r in self.columns[:12])
        more = f", ... ({len(self.columns)} columns)" if len(self.columns) > 12 else ""
        return (f"an object with the columns {shown}{more} (null = missing), or their {len(self.columns)} values "
                f"in order")


def v2_output_names(spec: Any) -> tuple[str, ...]:
    return V2_REGRESSION_OUTPUTS if isinstance(spec, TableSpec) and spec.regression else V2_OUTPUTS


def spec_for(preprocessor: Any, source: str | None, max_inputs: int,
             max_text_chars: int) -> InputSpec | TextSpec | TableSpec:
    """The request spec for a loaded model, from its preprocessor (``source``: the data source it was
    trained on, which fixes the pixel scale of PNG inputs)."""
    if getattr(preprocessor, "kind", None) == "table":
        return TableSpec(tuple((c["name"], c["role"]) for c in preprocessor.columns), max_inputs,
                         preprocessor.task == "regression")
    if preprocessor.raw_column == "text":
        return TextSpec(max_inputs, max_text_chars)
    return InputSpec(tuple(int(d) for d in preprocessor.input_shape), max_inputs,
                     pixel_scale=16.0 / 255.0 if source == "digits" else 1.0)


# -- pydantic models: documentation (OpenAPI at /docs) and response shapes ------------------------------
class PredictRequest(BaseModel):
    """Send exactly one of `input` / `inputs`."""
    input: list[float] | list[list[float]] | str | dict[str, Any] | None = Field(
        None, description="one input: flat numbers, a nested list matching the model's input shape, or a base64 "
                          "PNG; for a text model, the text; for a table model, {column: value} or the values in "
                          "column order")
    inputs: list[list[float] | list[list[float]] | str | dict[str, Any]] | None = Field(
        None, description="a batch of inputs (1..serve.max_inputs)")


class Prediction(BaseModel):
    label: str
    label_index: int
    probabilities: dict[str, float]
    model_version: int


class ValuePrediction(BaseModel):
    """A regression model's answer: a number in the label's units."""
    value: float
    model_version: int


class PredictResponse(BaseModel):
    model: str
    model_version: int
    predictions: list[Prediction | ValuePrediction]


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(None, description="absent when parameters.binary_data_size is given (the tensor's "
                                                     "bytes then follow the JSON; see Inference-Header-Content-Length)")
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    name: Literal["probabilities", "label", "value"] = Field(..., description="value: regression models")
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data": true} returns it as binary data')


class V2InferRequest(BaseModel):
    id: str | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


class ErrorResponse(BaseModel):
    error: str
    field: str
    expected: str
    status: int


# -- validation --------------------------------------------------------------------------------------
def _has_bool(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if v is True or v is False:
            return True
        if isinstance(v, list):
            stack.extend(v)
    return False


def _numeric_array(value: Any, field: str, expected: str, check_bool: bool = True) -> np.ndarray:
    """Any JSON value -> a numeric ndarray, or InputError naming the field. Refuses bools, strings, nulls,
    objects and ragged lists."""
    if not isinstance(value, list):
        raise InputError(422, field, f"got {type(value).__name__ if value is not None else 'null'}", expected)
    if check_bool and _has_bool(value):  # numpy would silently turn true/false into 1/0
        raise InputError(422, field, "contains a non-number (bool)", expected)
    try:
        arr = np.array(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InputError(422, field, "is a ragged or malformed nested list", expected) from None
    if arr.dtype.kind not in "iuf" or arr.size == 0:
        if arr.size == 0:
            raise InputError(422, field, "is empty", expected)
        raise InputError(422, field, "contains a non-number (string, bool, null or object)", expected)
    return arr


def _check_finite(arr: np.ndarray, field: str, expected: str, sub_shape: tuple[int, ...] | None = None) -> None:
    bad = ~np.isfinite(arr) if arr.dtype.kind == "f" else np.zeros(arr.shape, bool)
    bad |= np.abs(arr.astype(np.float64, copy=False)) > MAX_ABS
    if bad.any():
        idx = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), arr.shape)
        where = "".join(f"[{i}]" for i in idx)
        value = arr[idx]
        raise InputError(422, f"{field}{where}", f"value {float(value)!r} is not finite or out of range", expected)


def _decode_png(text: str, field: str, spec: InputSpec) -> np.ndarray:
    expected = spec.description
    if len(spec.input_shape) != 2:
        raise InputError(422, field, "got a string, but this model takes numbers only", expected)
    if len(text) > MAX_PNG_CHARS:
        raise InputError(413, field, f"PNG text is {len(text)} characters (limit {MAX_PNG_CHARS})", expected)
    if text.startswith(PNG_PREFIX):
        text = text[len(PNG_PREFIX):]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(422, field, "is a string but not valid base64", expected) from None
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise InputError(422, field, "is base64 but not a PNG image", expected)
    from PIL import Image  # imported lazily: numeric-only clients never pay for it

    h, w = spec.input_shape
    try:
        img = Image.open(io.BytesIO(raw), formats=["PNG"])
        if img.size != (w, h):  # checked on the header, before any pixel is decoded (no decompression bombs)
            raise InputError(422, field, f"PNG is {img.size[0]}x{img.size[1]} pixels", expected)
        pixels = np.asarray(img.convert("L"), dtype=np.float32)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad image, never a server error
        raise InputError(422, field, f"PNG cannot be decoded ({type(err).__name__})", expected) from None
    return pixels.reshape(-1) * np.float32(spec.pixel_scale)


def _one_input(value: Any, field: str, spec: InputSpec) -> np.ndarray:
    """One input -> float32 (D,)."""
    expected = spec.description
    if isinstance(value, str):
        return _decode_png(value, field, spec)
    arr = _numeric_array(value, field, expected)
    if arr.shape != (spec.dim,) and arr.shape != spec.input_shape:
        raise InputError(422, field, f"has shape {list(arr.shape)}", expected)
    _check_finite(arr, field, expected)
    return arr.astype(np.float32).reshape(-1)


def _may_have_bool(raw: bytes | None) -> bool:
    """JSON text without the tokens true/false holds no bools: skips a per-number scan on the hot path."""
    return raw is None or b"true" in raw or b"false" in raw


def _one_text(value: Any, field: str, spec: TextSpec) -> str:
    expected = spec.description
    if not isinstance(value, str):
        raise InputError(422, field, f"got {type(value).__name__ if value is not None else 'null'}, not a string",
                         expected)
    if len(value) > spec.max_chars:
        raise InputError(422, field, f"is {len(value)} characters (limit {spec.max_chars})", expected)
    if not value.strip():
        raise InputError(422, field, "is empty or only whitespace", expected)
    try:
        value.encode("utf-8")  # JSON may carry a lone surrogate ("\ud800"), which the tokenizer cannot take
    except UnicodeEncodeError:
        raise InputError(422, field, "is not valid Unicode (unpaired surrogate)", expected) from None
    return value


def _predict_body(body: Any) -> tuple[str, Any]:
    """The one field a /predict body holds: ("input", X) or ("inputs", [X, ...])."""
    expected_body = '{"input": X} or {"inputs": [X, ...]}'
    if not isinstance(body, dict):
        raise InputError(422, "body", f"is a JSON {type(body).__name__}, not an object", expected_body)
    unknown = sorted(set(body) - {"input", "inputs"})
    if unknown:
        raise InputError(422, unknown[0], "is not a known field", expected_body)
    if ("input" in body) == ("inputs" in body):
        raise InputError(422, "body", "must have exactly one of 'input' and 'inputs'", expected_body)
    key = "input" if "input" in body else "inputs"
    return key, body[key]


def _table_value(value: Any, field: str, role: str, spec: TableSpec) -> Any:
    """One cell: a finite number for a numeric column, a string/number/bool for a categorical one; null is a
    missing value (imputed as in training)."""
    if value is None:
        return None
    if role == "categorical":
        if isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
            return value
        raise InputError(422, field, f"got {type(value).__name__}", "a string, number or null (a category)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(422, field, f"got {type(value).__name__}, not a number", "a number or null")
    if not math.isfinite(value) or abs(value) > TABLE_MAX_ABS:
        raise InputError(422, field, f"value {value!r} is not finite or out of range", "a finite number or null")
    return float(value)


def _table_row(value: Any, field: str, spec: TableSpec) -> dict[str, Any]:
    """One table input -> {column: value}. Every feature column must be there, and no other."""
    if isinstance(value, dict):
        unknown = [k for k in value if k not in spec.names]
        if unknown:
            raise InputError(422, f"{field}.{unknown[0]}", "is not a column of this model", spec.description)
        missing = [n for n in spec.names if n not in value]
        if missing:
            raise InputError(422, f"{field}.{missing[0]}", "is missing (send null for an unknown value)",
                             spec.description)
        items = [(n, value[n]) for n in spec.names]
    elif isinstance(value, list):
        if len(value) != len(spec.names):
            raise InputError(422, field, f"has {len(value)} values for {len(spec.names)} columns", spec.description)
        items = list(zip(spec.names, value))
    else:
        raise InputError(422, field, f"got {type(value).__name__ if value is not None else 'null'}", spec.description)
    roles = dict(spec.columns)
    return {n: _table_value(v, f"{field}.{n}", roles[n], spec) for n, v in items}


def _check_batch(items: Any, spec: InputSpec | TextSpec | TableSpec) -> None:
    expected = f"a list of 1..{spec.max_inputs} inputs, each {spec.description}"
    if not isinstance(items, list):
        raise InputError(422, "inputs", f"is a {type(items).__name__}, not a list", expected)
    if not items:
        raise InputError(422, "inputs", "is an empty batch", expected)
    if len(items) > spec.max_inputs:
        raise InputError(422, "inputs", f"has {len(items)} inputs (limit {spec.max_inputs})", expected)


def parse_predict(body: Any, spec: InputSpec | TextSpec | TableSpec,
                  raw: bytes | None = None) -> np.ndarray | list[str] | list[dict]:
    """A /predict JSON body (``raw``: its text, if at hand) -> float32 (N, D), N texts for a TextSpec, or N
    {column: value} rows for a TableSpec. Raises InputError."""
    key, items = _predict_body(body)
    if isinstance(spec, TableSpec):
        if key == "input":
            return [_table_row(items, "input", spec)]
        _check_batch(items, spec)
        return [_table_row(v, f"inputs[{i}]", spec) for i, v in enumerate(items)]
    if isinstance(spec, TextSpec):
        if key == "input":
            return [_one_text(items, "input", spec)]
        _check_batch(items, spec)
        return [_one_text(v, f"inputs[{i}]", spec) for i, v in enumerate(items)]
    if key == "input":
        return _one_input(items, "input", spec)[None, :]
    _check_batch(items, spec)
    # Fast path: a rectangular all-number batch is checked in one vectorised pass.
    if not any(isinstance(v, str) for v in items) and not (_may_have_bool(raw) and _has_bool(items)):
        try:
            arr = np.array(items)
        except (ValueError, TypeError, OverflowError, RecursionError):
            arr = None
        if arr is not None and arr.dtype.kind in "iuf" and arr.shape[1:] in ((spec.dim,), spec.input_shape):
            _check_finite(arr, "inputs", spec.description)
            return arr.astype(np.float32).reshape(len(items), spec.dim)
    return np.stack([_one_input(v, f"inputs[{i}]", spec) for i, v in enumerate(items)])


def _v2_tensor(body: Any, expected_body: str) -> tuple[dict, str | None]:
    """The one input tensor of an infer body (name checked; shape, datatype and data not yet), and the id."""
    if not isinstance(body, dict):
        raise InputError(422, "body", f"is a JSON {type(body).__name__}, not an object", expected_body)
    unknown = sorted(set(body) - {"id", "inputs", "outputs", "parameters"})
    if unknown:
        raise InputError(422, unknown[0], "is not a known field", expected_body)
    req_id = body.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InputError(422, "id", f"is a {type(req_id).__name__}", "a string")
    if body.get("parameters") is not None and not isinstance(body["parameters"], dict):
        raise InputError(422, "parameters", "is not an object", "an object")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise InputError(422, "inputs", "must be a list holding exactly one tensor", expected_body)
    t = inputs[0]
    if not isinstance(t, dict):
        raise InputError(422, "inputs[0]", "is not an object", expected_body)
    unknown = sorted(set(t) - {"name", "shape", "datatype", "data", "parameters"})
    if unknown:
        raise InputError(422, f"inputs[0].{unknown[0]}", "is not a known field", expected_body)
    if t.get("name") != "input":
        raise InputError(422, "inputs[0].name", f"is {t.get('name')!r}", '"input"')
    return t, req_id


def _bool_param(params: Any, key: str, field: str) -> bool | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InputError(422, field, "is not an object", "an object")
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise InputError(422, f"{field}.{key}", f"is {value!r}", "true or false")
    return value


def v2_outputs(body: dict, names: tuple[str, ...] = V2_OUTPUTS) -> list[tuple[str, bool]]:
    """The requested outputs of an infer body (``names``: those the model has), each with whether it goes back
    as binary data: an output's own ``parameters.binary_data``, else the request's
    ``parameters.binary_data_output``, else JSON."""
    default = bool(_bool_param(body.get("parameters"), "binary_data_output", "parameters"))
    outs = body.get("outputs")
    if outs is None:
        return [(name, default) for name in names]
    if not isinstance(outs, list) or not all(isinstance(o, dict) for o in outs):
        raise InputError(422, "outputs", "is not a list of objects",
                         "[" + ", ".join(f'{{"name": "{n}"}}' for n in names) + "]")
    plan = []
    for i, o in enumerate(outs):
        if o.get("name") not in names:
            raise InputError(422, f"outputs[{i}].name", f"is {o.get('name')!r}", f"one of {', '.join(names)}")
        binary = _bool_param(o.get("parameters"), "binary_data", f"outputs[{i}].parameters")
        plan.append((o["name"], default if binary is None else binary))
    return plan


def _v2_outputs(body: dict, names: tuple[str, ...] = V2_OUTPUTS) -> list[str]:
    return [name for name, _ in v2_outputs(body, names)]


def _binary_input(t: dict, binary: bytes) -> bytes | None:
    """The raw bytes of input 0 when it is sent as binary data (``parameters.binary_data_size``), else None.
    ``binary``: everything after the JSON header."""
    params = t.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InputError(422, "inputs[0].parameters", "is not an object", "an object")
    size = (params or {}).get("binary_data_size")
    field = "inputs[0].parameters.binary_data_size"
    if size is None:
        if binary:
            raise InputError(400, "body", f"has {len(binary)} bytes of binary data after the JSON header, but no input "
                             "declares parameters.binary_data_size", "binary data only for inputs that declare it")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InputError(400, field, f"is {size!r}", "a non-negative integer (bytes)")
    if "data" in t:
        raise InputError(400, "inputs[0].data", "is given together with parameters.binary_data_size",
                         "either data (JSON) or binary_data_size (binary data), not both")
    if size != len(binary):
        raise InputError(400, field, f"of input {t.get('name')!r} is {size}, but {len(binary)} bytes of binary data "
                         "follow the JSON header", f"{len(binary)} (the size of the binary data)")
    return binary


def decode_bytes_tensor(buf: bytes, field: str, max_items: int) -> list[bytes]:
    """BYTES binary data (each element: 4-byte little-endian length, then the bytes) -> the elements. Stops with
    InputError past ``max_items`` elements or on a truncated element."""
    items: list[bytes] = []
    i, end = 0, len(buf)
    while i < end:
        if len(items) >= max_items:
            raise InputError(400, field, f"holds more than {max_items} BYTES elements", f"at most {max_items} elements")
        if i + 4 > end:
            raise InputError(400, field, f"ends inside the 4-byte length of element {len(items)}",
                             "elements of a 4-byte little-endian length followed by that many bytes")
        (n,) = struct.unpack_from("<I", buf, i)
        i += 4
        if i + n > end:
            raise InputError(400, field, f"element {len(items)} declares {n} bytes but only {end - i} remain",
                             "elements of a 4-byte little-endian length followed by that many bytes")
        items.append(bytes(buf[i:i + n]))
        i += n
    return items


def encode_bytes_tensor(items: list[str]) -> bytes:
    parts = []
    for item in items:
        raw = item.encode("utf-8")
        parts += (struct.pack("<I", len(raw)), raw)
    return b"".join(parts)


def v2_response(model_name: str, model_version: str, req_id: str | None,
                outputs: list[tuple[str, str, list[int], Any, bool]]) -> tuple[bytes, int | None]:
    """An infer response body. ``outputs``: (name, datatype, shape, values, binary). Returns (body, None) for plain
    JSON, or (JSON header + binary tensor data, header length) when any output goes back as binary data."""
    out, blobs = [], []
    for name, dtype, shape, values, binary in outputs:
        t: dict[str, Any] = {"name": name, "datatype": dtype, "shape": shape}
        if dtype == "BYTES":
            if binary:
                blobs.append(encode_bytes_tensor(values))
            else:
                t["data"] = list(values)
        elif binary:
            blobs.append(np.ascontiguousarray(values, dtype=V2_NUMPY[dtype]).tobytes())
        else:
            t["data"] = [float(v) for v in np.asarray(values).reshape(-1)]
        if binary:
            t["parameters"] = {"binary_data_size": len(blobs[-1])}
        out.append(t)
    resp: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": out}
    if req_id is not None:
        resp["id"] = req_id
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def _parse_v2_text(body: Any, spec: TextSpec, binary: bytes = b"") -> tuple[list[str], str | None, list[str]]:
    expected_body = '{"inputs": [{"name": "input", "shape": [N], "datatype": "BYTES", "data": ["text", ...]}]}'
    t, req_id = _v2_tensor(body, expected_body)
    dtype = t.get("datatype")
    if dtype != "BYTES":
        raise InputError(422, "inputs[0].datatype", f"is {dtype!r}", "BYTES (this model takes text)")
    shape = t.get("shape")
    shape_expected = f"[N] or [N, 1] with 1 <= N <= {spec.max_inputs}"
    if (not isinstance(shape, list) or len(shape) not in (1, 2) or shape[1:] not in ([], [1])
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise InputError(422, "inputs[0].shape", f"is {shape!r}", shape_expected)
    n = shape[0]
    if n < 1:
        raise InputError(422, "inputs[0].shape", f"has batch size {n} (empty batch)", shape_expected)
    if n > spec.max_inputs:
        raise InputError(422, "inputs[0].shape", f"has batch size {n} (limit {spec.max_inputs})", shape_expected)
    data_expected = f"{n} strings, each {spec.description}"
    raw_bytes = _binary_input(t, binary)
    if raw_bytes is not None:
        field = "inputs[0].parameters.binary_data_size"
        items = decode_bytes_tensor(raw_bytes, field, n)
        if len(items) != n:
            raise InputError(400, field, f"of input {t.get('name')!r} covers {len(items)} BYTES elements, shape {shape} "
                             f"needs {n}", f"{n} length-prefixed strings")
        texts = []
        for i, item in enumerate(items):
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(422, f"inputs[0].data[{i}]", "is not valid UTF-8", spec.description) from None
            texts.append(_one_text(text, f"inputs[0].data[{i}]", spec))
        return texts, req_id, _v2_outputs(body)
    data = t.get("data")
    if not isinstance(data, list):
        raise InputError(422, "inputs[0].data", f"is {type(data).__name__ if data is not None else 'null'}",
                         data_expected)
    if len(shape) == 2 and all(isinstance(row, list) for row in data):  # [N, 1] sent nested: [["a"], ["b"]]
        data = [v for row in data for v in row]
    if len(data) != n:
        raise InputError(422, "inputs[0].data", f"has {len(data)} elements, shape {shape} needs {n}", data_expected)
    texts = [_one_text(v, f"inputs[0].data[{i}]", spec) for i, v in enumerate(data)]
    return texts, req_id, _v2_outputs(body)


def _parse_v2_table(body: Any, spec: TableSpec, raw: bytes | None,
                    binary: bytes) -> tuple[list[dict], str | None, list[str]]:
    """A table model's v2 input: FP32 [N, columns] in the model's column order, for numeric columns only (a
    category is text, which an FP32 tensor cannot carry: those models take /predict with named features)."""
    if spec.categorical:
        raise InputError(422, "inputs[0]", f"this model has categorical columns ({', '.join(spec.categorical)}), "
                                           f"which a numeric tensor cannot carry", "POST /predict with named features")
    x, req_id, outputs = parse_v2_infer(body, InputSpec((len(spec.names),), spec.max_inputs), raw, binary,
                                        output_names=v2_output_names(spec))
    return [dict(zip(spec.names, map(float, row))) for row in x], req_id, outputs


def parse_v2_infer(body: Any, spec: InputSpec | TextSpec | TableSpec, raw: bytes | None = None,
                   binary: bytes = b"", output_names: tuple[str, ...] = V2_OUTPUTS,
                   ) -> tuple[np.ndarray | list[str] | list[dict], str | None, list[str]]:
    """An Open Inference Protocol infer body (``raw``: its JSON text; ``binary``: the binary tensor data after it)
    -> (float32 (N, D), N texts for a TextSpec or N rows for a TableSpec; request id; output names)."""
    if isinstance(spec, TableSpec):
        return _parse_v2_table(body, spec, raw, binary)
    if isinstance(spec, TextSpec):
        return _parse_v2_text(body, spec, binary)
    dims = list(spec.input_shape)
    expected_body = ('{"inputs": [{"name": "input", "shape": [N, ' + ", ".join(map(str, dims)) + '], '
                     '"datatype": "FP32", "data": [...]}]}')
    t, req_id = _v2_tensor(body, expected_body)
    dtype = t.get("datatype")
    if dtype not in V2_DATATYPES:
        raise InputError(422, "inputs[0].datatype", f"is {dtype!r}", f"one of {', '.join(V2_DATATYPES)} (FP32 preferred)")
    shape = t.get("shape")
    shape_expected = f"[N, {', '.join(map(str, dims))}] or [N, {spec.dim}] with 1 <= N <= {spec.max_inputs}"
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise InputError(422, "inputs[0].shape", f"is {shape!r}", shape_expected)
    if shape[1:] != dims and shape[1:] != [spec.dim]:
        raise InputError(422, "inputs[0].shape", f"is {shape}", shape_expected)
    n = shape[0]
    if n < 1:
        raise InputError(422, "inputs[0].shape", f"has batch size {n} (empty batch)", shape_expected)
    if n > spec.max_inputs:
        raise InputError(422, "inputs[0].shape", f"has batch size {n} (limit {spec.max_inputs})", shape_expected)
    data_expected = f"{n * spec.dim} {dtype} numbers, flat or nested, row-major"
    raw_bytes = _binary_input(t, binary)
    if raw_bytes is not None:
        need = n * spec.dim * np.dtype(V2_NUMPY[dtype]).itemsize
        if len(raw_bytes) != need:
            raise InputError(400, "inputs[0].parameters.binary_data_size",
                             f"of input {t.get('name')!r} is {len(raw_bytes)} bytes, shape {shape} x {dtype} needs {need}",
                             f"{need} bytes ({n * spec.dim} little-endian {dtype} values, row-major)")
        flat = np.frombuffer(raw_bytes, dtype=V2_NUMPY[dtype])
        _check_finite(flat, "inputs[0].data", data_expected)
        return flat.astype(np.float32).reshape(n, spec.dim), req_id, _v2_outputs(body, output_names)
    data = t.get("data")
    arr = _numeric_array(data, "inputs[0].data", data_expected, check_bool=_may_have_bool(raw))
    if arr.size != n * spec.dim:
        raise InputError(422, "inputs[0].data", f"has {arr.size} elements, shape {shape} needs {n * spec.dim}",
                         data_expected)
    kind = V2_DATATYPES[dtype]
    if kind in "iu":
        if arr.dtype.kind == "f":
            raise InputError(422, "inputs[0].data", f"holds fractional numbers but datatype is {dtype}", data_expected)
        lo, hi = _INT_RANGES[dtype]
        if arr.min() < lo or arr.max() > hi:
            raise InputError(422, "inputs[0].data", f"has a value outside the {dtype} range", data_expected)
    if dtype == "FP16":
        finite16 = np.abs(arr.astype(np.float64)) <= 65504
        if not finite16.all():
            raise InputError(422, "inputs[0].data", "has a value outside the FP16 range", data_expected)
    flat = arr.reshape(-1)
    _check_finite(flat, "inputs[0].data", data_expected)
    return flat.astype(np.float32).reshape(n, spec.dim), req_id, _v2_outputs(body, output_names)


def check_content_type(value: str | None, header_length: str | None = None, binary_ok: bool = False) -> int | None:
    """Which body a request carries: None -> the whole body is JSON; an int L -> a JSON header of L bytes followed
    by binary tensor data (``Inference-Header-Content-Length: L``, only where ``binary_ok``). A JSON body may come
    without a Content-Type (Triton's and KServe's clients send none)."""
    media = (value or "").split(";", 1)[0].strip().lower()
    expected = "application/json (or no Content-Type)"
    if binary_ok:
        expected += f", or application/octet-stream with {V2_HEADER_LENGTH}"
    if media not in ("", "application/json", *(("application/octet-stream",) if binary_ok else ())):
        raise InputError(415, "Content-Type", f"is {value!r}", expected)
    if header_length is None:
        if media == "application/octet-stream":
            raise InputError(400, V2_HEADER_LENGTH, "is missing (an application/octet-stream body needs it)",
                             "the byte length of the JSON header at the start of the body")
        return None
    if not binary_ok:
        raise InputError(400, V2_HEADER_LENGTH, "is only read by /v2/models/{name}/infer", "no such header here")
    text = header_length.strip()
    if not text.isdigit() or len(text) > 18:
        raise InputError(400, V2_HEADER_LENGTH, f"is {header_length!r}", "a non-negative integer (bytes)")
    return int(text)


def split_body(buf: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a body, split at ``header_length`` (None: all JSON)."""
    if header_length is None:
        return buf, b""
    if header_length > len(buf):
        raise InputError(400, V2_HEADER_LENGTH, f"is {header_length}, but the body is only {len(buf)} bytes",
                         "at most the body length")
    return buf[:header_length], buf[header_length:]


def finite_rows(probs: np.ndarray) -> np.ndarray:
    """Rows whose probabilities are all finite (a guard: a NaN must never be serialised)."""
    return np.isfinite(probs).all(axis=1)


def clean_float(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0
