"""The Open Inference Protocol v2 (KServe / Triton REST) for the Serve app: request parsing, the binary tensor
data extension, response bodies. Pure functions: no Ray, no HTTP. ``InputError``, the input specs and the
checks of one input are schemas.py's, shared with /predict.

/v2/models/{name}/infer body:
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

import json
import struct
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from modelworks.serve.schemas import (InputError, InputSpec, TableSpec, TextSpec, _check_finite, _may_have_bool,
                                      _numeric_array, _one_text)

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
V2_HEADER_LENGTH = "Inference-Header-Content-Length"
# Binary tensor data: little-endian, native size of each datatype.
V2_NUMPY = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
            "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}


# -- pydantic models: documentation (OpenAPI at /docs) and response shapes ------------------------------
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


# -- the request body: JSON, or a JSON header followed by binary tensor data ---------------------------------
# Every endpoint's body is read through these; only infer (binary_ok) takes binary data.
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


# -- parsing an infer request --------------------------------------------------------------------------------
def v2_output_names(spec: Any) -> tuple[str, ...]:
    return V2_REGRESSION_OUTPUTS if isinstance(spec, TableSpec) and spec.regression else V2_OUTPUTS


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


def _batch_size(shape: list, max_inputs: int, shape_expected: str) -> int:
    """The batch size (the first dimension), between 1 and the model's limit."""
    n = shape[0]
    if n < 1:
        raise InputError(422, "inputs[0].shape", f"has batch size {n} (empty batch)", shape_expected)
    if n > max_inputs:
        raise InputError(422, "inputs[0].shape", f"has batch size {n} (limit {max_inputs})", shape_expected)
    return n


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
    n = _batch_size(shape, spec.max_inputs, shape_expected)
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
    n = _batch_size(shape, spec.max_inputs, shape_expected)
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


# -- the response --------------------------------------------------------------------------------------------
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


def model_metadata(s: Any) -> dict:
    """The model metadata answer (GET /v2/models/{name}) for ``s``, the model app.py serves (``served.Served``)."""
    params: dict[str, Any] = {"class_names": list(s.class_names)}
    if s.language_model:  # not v2-inferable: described for discovery, answered at POST /generate
        return {"name": s.name, "versions": [str(s.version)], "platform": "pytorch_safetensors",
                "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1]}],
                "outputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}],
                "parameters": {"task": "language_model", "endpoint": "POST /generate",
                               "vocab_size": s.spec.vocab_size}}
    if isinstance(s.spec, TextSpec):
        tensor = {"name": "input", "datatype": "BYTES", "shape": [-1]}
    elif isinstance(s.spec, TableSpec):
        tensor = {"name": "input", "datatype": "FP32", "shape": [-1, len(s.spec.names)]}
        params.update(feature_names=list(s.spec.names), categorical_columns=list(s.spec.categorical))
    else:
        tensor = {"name": "input", "datatype": "FP32", "shape": [-1, *s.spec.input_shape]}
    if s.model.task == "regression":
        outputs = [{"name": "value", "datatype": "FP32", "shape": [-1, 1]}]
    else:
        outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(s.class_names)]},
                   {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    return {"name": s.name, "versions": [str(s.version)], "platform": "pytorch_safetensors",
            "inputs": [tensor], "outputs": outputs, "parameters": params}
