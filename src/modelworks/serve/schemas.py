"""Input validation for the Serve app, and the /predict request and response models. Pure functions: no Ray,
no HTTP.

Every input a client sends is checked here before it can reach the model (v2_schemas.py reads Open Inference
Protocol bodies with the same checks of each input; generate_schemas.py reads /generate's). A problem raises
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
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

MAX_ABS = 1e6                 # inputs are pixels/features: anything larger is a client error, not a model input
PNG_PREFIX = "data:image/png;base64,"
MAX_PNG_CHARS = 256 * 1024    # base64 text per image (a 28x28 grayscale PNG is < 1 KiB)
TABLE_MAX_ABS = 1e30          # table features are in their own units (prices, counts): only float32 overflow is refused


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


class ErrorResponse(BaseModel):
    """Every error this app answers (InputError.to_dict, and the 404/405 of an unknown path or method)."""
    error: str = Field(..., description="one line: '<field>: <what is wrong>; expected <what is expected>'")
    field: str = Field(..., description="what was wrong: a body field (e.g. inputs[0].shape), a header, body, "
                                        "path, model_name, model, request, ...")
    expected: str
    status: int = Field(..., description="the HTTP status, repeated")


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


def finite_rows(probs: np.ndarray) -> np.ndarray:
    """Rows whose probabilities are all finite (a guard: a NaN must never be serialised)."""
    return np.isfinite(probs).all(axis=1)


def clean_float(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0
