"""Serve input validation and config building, without Ray or HTTP (fast)."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from modelworks.cli import main
from modelworks.config import ServeConfig
from modelworks.errors import UserError
from modelworks.serve import schemas, v2_schemas
from modelworks.serve.cli import parse_replicas
from modelworks.serve.schemas import InputError, InputSpec, TableSpec, TextSpec

SPEC = InputSpec((8, 8), max_inputs=4, pixel_scale=16 / 255)
TEXT = TextSpec(max_inputs=4, max_chars=50)
TABLE = TableSpec((("alcohol", "numeric"), ("hue", "numeric"), ("region", "categorical")), max_inputs=4)
NUMERIC_TABLE = TableSpec((("age", "numeric"), ("bmi", "numeric")), max_inputs=4, regression=True)


def png_b64(w: int, h: int, value: int = 255) -> str:
    buf = io.BytesIO()
    Image.new("L", (w, h), color=value).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def err(fn, *args) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args)
    return info.value


def test_predict_accepts_flat_nested_png_and_batches():
    flat = list(range(64))
    nested = np.arange(64).reshape(8, 8).tolist()
    assert schemas.parse_predict({"input": flat}, SPEC).shape == (1, 64)
    assert np.array_equal(schemas.parse_predict({"input": nested}, SPEC)[0], np.arange(64, dtype=np.float32))
    x = schemas.parse_predict({"inputs": [flat, nested, png_b64(8, 8)]}, SPEC)
    assert x.shape == (3, 64) and x.dtype == np.float32
    assert np.allclose(x[2], 16.0)  # white PNG pixels scaled to the digits range 0..16
    assert schemas.parse_predict({"input": "data:image/png;base64," + png_b64(8, 8, 0)}, SPEC).max() == 0


@pytest.mark.parametrize("body, field, fragment", [
    ({"input": list(range(63))}, "input", "shape [63]"),
    ({"input": [[1] * 8] * 7}, "input", "shape [7, 8]"),
    ({"input": [1] * 63 + ["x"]}, "input", "non-number"),
    ({"input": [1] * 63 + [None]}, "input", "non-number"),
    ({"inputs": [[1] * 63 + [True]]}, "inputs[0]", "non-number"),
    ({"input": [1] * 63 + [float("nan")]}, "input[63]", "not finite"),
    ({"inputs": [[0] * 64, [1] * 63 + [float("inf")]]}, "inputs[1][63]", "not finite"),
    ({"input": [1] * 63 + [1e300]}, "input[63]", "out of range"),
    ({"inputs": []}, "inputs", "empty batch"),
    ({"inputs": [[0] * 64] * 5}, "inputs", "limit 4"),
    ({"inputs": [[0] * 64, [0] * 10]}, "inputs[1]", "shape [10]"),
    ({"inputs": {"a": 1}}, "inputs", "not a list"),
    ({}, "body", "exactly one"),
    ({"input": [0] * 64, "inputs": [[0] * 64]}, "body", "exactly one"),
    ({"input": [0] * 64, "path": "/etc/passwd"}, "path", "not a known field"),
    ([1, 2], "body", "not an object"),
    ({"input": "not base64!!"}, "input", "not valid base64"),
    ({"input": base64.b64encode(b"GIF89a....").decode()}, "input", "not a PNG"),
    ({"input": png_b64(28, 28)}, "input", "28x28 pixels"),
    ({"input": 5}, "input", "got int"),
])
def test_predict_rejects_with_field_and_expected_form(body, field, fragment):
    e = err(schemas.parse_predict, body, SPEC)
    assert e.status == 422
    assert e.field == field and fragment in e.message, e.to_dict()
    d = e.to_dict()
    assert d["expected"] and d["field"] == field and field in d["error"]


def test_png_header_size_checked_before_decoding():
    # A huge (but tiny-to-send) PNG is refused from its header, not decoded.
    e = err(schemas.parse_predict, {"input": png_b64(4000, 4000, 0)}, SPEC)
    assert "4000x4000" in e.message
    e = err(schemas.parse_predict, {"input": "A" * (schemas.MAX_PNG_CHARS + 4)}, SPEC)
    assert e.status == 413


def v2(shape, data, datatype="FP32", name="input", **extra):
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}], **extra}


def test_v2_parses_typed_tensors():
    x, rid, outs = v2_schemas.parse_v2_infer(v2([2, 8, 8], list(range(128)), id="r1"), SPEC)
    assert x.shape == (2, 64) and rid == "r1" and outs == ["probabilities", "label"]
    x, _, outs = v2_schemas.parse_v2_infer(v2([1, 64], [list(range(64))], "UINT8", outputs=[{"name": "label"}]), SPEC)
    assert x.shape == (1, 64) and outs == ["label"]


@pytest.mark.parametrize("body, field", [
    (v2([1, 8, 8], [0] * 64, "BYTES"), "inputs[0].datatype"),
    (v2([1, 8, 8], [0] * 64, "BOOL"), "inputs[0].datatype"),
    (v2([1, 8, 7], [0] * 56), "inputs[0].shape"),
    (v2([0, 8, 8], []), "inputs[0].shape"),
    (v2([5, 64], [0] * 320), "inputs[0].shape"),
    (v2([1, 8, 8], [0] * 63), "inputs[0].data"),
    (v2([1, 8, 8], [0.5] * 64, "INT32"), "inputs[0].data"),
    (v2([1, 8, 8], [300] * 64, "UINT8"), "inputs[0].data"),
    (v2([1, 8, 8], [0] * 63 + ["1"]), "inputs[0].data"),
    (v2([1, 8, 8], [0] * 63 + [True]), "inputs[0].data"),
    (v2([1, 8, 8], [0] * 63 + [float("nan")]), "inputs[0].data[63]"),
    (v2([1, 8, 8], [0] * 64, name="x"), "inputs[0].name"),
    (v2(["1", 8, 8], [0] * 64), "inputs[0].shape"),
    (v2([1, 8, 8], [0] * 64, outputs=[{"name": "logits"}]), "outputs[0].name"),
    ({"inputs": []}, "inputs"),
    ({"inputs": [{"name": "input"}], "extra": 1}, "extra"),
])
def test_v2_rejects(body, field):
    e = err(v2_schemas.parse_v2_infer, body, SPEC)
    assert e.status == 422 and e.field == field, e.to_dict()


def test_predict_text_single_and_batch():
    assert schemas.parse_predict({"input": "a gorgeous, witty film"}, TEXT) == ["a gorgeous, witty film"]
    texts = ["ok", "x" * 50, "  padded  ", "🙂 ünïcode \x00"]  # at the limit, odd but valid text is accepted as is
    assert schemas.parse_predict({"inputs": texts}, TEXT) == texts


@pytest.mark.parametrize("body, field, fragment", [
    ({"input": 5}, "input", "got int, not a string"),
    ({"input": None}, "input", "got null"),
    ({"input": ["a film"]}, "input", "got list"),
    ({"input": [0.0] * 64}, "input", "got list"),          # numbers sent to a text model
    ({"input": ""}, "input", "empty"),
    ({"input": " \n\t "}, "input", "only whitespace"),
    ({"input": "x" * 51}, "input", "51 characters (limit 50)"),
    ({"input": "\ud800"}, "input", "unpaired surrogate"),  # JSON can carry it; the tokenizer cannot take it
    ({"inputs": ["ok", "x" * 51]}, "inputs[1]", "limit 50"),
    ({"inputs": ["ok", 3]}, "inputs[1]", "not a string"),
    ({"inputs": ["ok", "ok", ""]}, "inputs[2]", "empty"),
    ({"inputs": ["ok"] * 5}, "inputs", "5 inputs (limit 4)"),
    ({"inputs": []}, "inputs", "empty batch"),
    ({"inputs": "a film"}, "inputs", "not a list"),
    ({"text": "a film"}, "text", "not a known field"),
    ({}, "body", "exactly one"),
])
def test_predict_text_rejects_with_field_and_limit(body, field, fragment):
    e = err(schemas.parse_predict, body, TEXT)
    assert e.status == 422 and e.field == field and fragment in e.message, e.to_dict()
    assert field in e.to_dict()["error"] and e.expected


def test_v2_text_parses_bytes_tensors():
    texts, rid, outs = v2_schemas.parse_v2_infer(v2([2], ["a film", "a dull film"], "BYTES", id="t1"), TEXT)
    assert texts == ["a film", "a dull film"] and rid == "t1" and outs == ["probabilities", "label"]
    texts, _, outs = v2_schemas.parse_v2_infer(v2([2, 1], [["a"], ["b"]], "BYTES", outputs=[{"name": "label"}]), TEXT)
    assert texts == ["a", "b"] and outs == ["label"]
    assert v2_schemas.parse_v2_infer(v2([1, 1], ["a"], "BYTES"), TEXT)[0] == ["a"]


@pytest.mark.parametrize("body, field", [
    (v2([1], ["a film"], "FP32"), "inputs[0].datatype"),
    (v2([1, 64], [0.0] * 64), "inputs[0].datatype"),      # an image tensor sent to a text model
    (v2([1, 2], ["a", "b"], "BYTES"), "inputs[0].shape"),
    (v2([1, 1, 1], ["a"], "BYTES"), "inputs[0].shape"),
    (v2(["1"], ["a"], "BYTES"), "inputs[0].shape"),
    (v2([0], [], "BYTES"), "inputs[0].shape"),
    (v2([5], ["a"] * 5, "BYTES"), "inputs[0].shape"),     # over max_inputs
    (v2([2], ["a"], "BYTES"), "inputs[0].data"),
    (v2([1], "a", "BYTES"), "inputs[0].data"),
    (v2([1], [3], "BYTES"), "inputs[0].data[0]"),
    (v2([2], ["a", " "], "BYTES"), "inputs[0].data[1]"),
    (v2([1], ["x" * 51], "BYTES"), "inputs[0].data[0]"),
    (v2([1], ["a"], "BYTES", name="text"), "inputs[0].name"),
    (v2([1], ["a"], "BYTES", outputs=[{"name": "logits"}]), "outputs[0].name"),
])
def test_v2_text_rejects(body, field):
    e = err(v2_schemas.parse_v2_infer, body, TEXT)
    assert e.status == 422 and e.field == field, e.to_dict()


def test_predict_table_takes_named_features_or_ordered_values():
    rows = schemas.parse_predict({"input": {"region": "north", "hue": 1, "alcohol": 13.2}}, TABLE)
    assert rows == [{"alcohol": 13.2, "hue": 1.0, "region": "north"}]  # the model's column order
    assert schemas.parse_predict({"input": [13.2, 1, "north"]}, TABLE) == rows
    # null is a missing value (imputed as in training); a category may be a number or a bool
    batch = schemas.parse_predict({"inputs": [{"alcohol": None, "hue": 0.5, "region": None},
                                              [12, 0.7, 3]]}, TABLE)
    assert batch == [{"alcohol": None, "hue": 0.5, "region": None}, {"alcohol": 12.0, "hue": 0.7, "region": 3}]


@pytest.mark.parametrize("body, field, fragment", [
    ({"input": {"alcohol": 13.2, "hue": 1.0}}, "input.region", "is missing"),
    ({"input": {"alcohol": 13.2, "hue": 1.0, "region": "x", "colour": "red"}}, "input.colour", "not a column"),
    ({"inputs": [[1, 2, "x"], {"alcohol": 1, "hue": 2}]}, "inputs[1].region", "is missing"),
    ({"input": {"alcohol": "high", "hue": 1.0, "region": "x"}}, "input.alcohol", "not a number"),
    ({"input": {"alcohol": True, "hue": 1.0, "region": "x"}}, "input.alcohol", "not a number"),
    ({"input": {"alcohol": 1e300, "hue": 1.0, "region": "x"}}, "input.alcohol", "out of range"),
    ({"input": {"alcohol": 1.0, "hue": 1.0, "region": {"a": 1}}}, "input.region", "got dict"),
    ({"input": [1.0, 2.0]}, "input", "2 values for 3 columns"),
    ({"input": "13.2,1,north"}, "input", "got str"),
    ({"inputs": [[1, 2, "x"]] * 5}, "inputs", "limit 4"),
])
def test_predict_table_rejects_naming_the_column(body, field, fragment):
    e = err(schemas.parse_predict, body, TABLE)
    assert (e.status, e.field) == (422, field) and fragment in e.message, e.to_dict()


def test_v2_table_numeric_only_and_regression_outputs():
    body = {"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [50, 22.5, 61, 30.1]}],
            "outputs": [{"name": "value"}]}
    rows, _, outputs = v2_schemas.parse_v2_infer(body, NUMERIC_TABLE)
    assert rows == [{"age": 50.0, "bmi": 22.5}, {"age": 61.0, "bmi": pytest.approx(30.1)}] and outputs == ["value"]
    assert v2_schemas.v2_output_names(NUMERIC_TABLE) == ("value",)
    assert v2_schemas.v2_output_names(TABLE) == v2_schemas.V2_OUTPUTS
    wrong = {**body, "outputs": [{"name": "probabilities"}]}
    assert err(v2_schemas.parse_v2_infer, wrong, NUMERIC_TABLE).field == "outputs[0].name"
    categorical = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    e = err(v2_schemas.parse_v2_infer, categorical, TABLE)
    assert e.status == 422 and "region" in e.message and "/predict" in e.expected


def test_spec_follows_the_model_and_serve_config():
    from modelworks.data import text
    from modelworks.data.preprocess import Preprocessor
    from modelworks.data.table import TablePreprocessor
    from modelworks.serve.testing import TEXT_CLASS_NAMES, sentiment_data

    cfg = ServeConfig()
    assert cfg.max_text_chars == 2000
    pre = text.fit(*sentiment_data(), TEXT_CLASS_NAMES, vocab_size=200, max_len=32)
    assert schemas.spec_for(pre, "text", cfg.max_inputs, cfg.max_text_chars) == TextSpec(256, 2000)
    image = schemas.spec_for(Preprocessor([8, 8], 0.0, 1.0, [0, 1]), "digits", 256, 2000)
    assert image == InputSpec((8, 8), 256, pixel_scale=16 / 255)
    columns = [{"name": "age", "role": "numeric"}, {"name": "bmi", "role": "numeric"}]
    assert schemas.spec_for(TablePreprocessor(columns, "regression", []), "sklearn", 4, 2000) == NUMERIC_TABLE


def test_register_text_is_a_real_model_with_a_valid_config(modelworks_home):
    from modelworks.config import validate
    from modelworks.registry import Registry
    from modelworks.serve.testing import register_text

    reg = Registry()
    assert register_text(reg) == 1
    loaded, _ = reg.load("sentiment@latest")
    cfg = validate(loaded.config)
    assert cfg.data.source == "text" and cfg.model.name == "transformer"
    assert loaded.class_names == ["negative", "positive"] and loaded.metrics["test_accuracy"] == 1.0
    probs = loaded.predict_proba(["a gorgeous, witty film", "a dull, tedious film"]).numpy()
    assert probs.argmax(1).tolist() == [1, 0] and probs.max(1).min() > 0.8  # unseen phrasing, confident


def test_content_type():
    for ok in ("application/json; charset=utf-8", "application/json", None, ""):  # no Content-Type: JSON (Triton)
        assert v2_schemas.check_content_type(ok) is None and v2_schemas.check_content_type(ok, None, True) is None
    for bad in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        assert err(v2_schemas.check_content_type, bad).status == 415
        assert err(v2_schemas.check_content_type, bad, "10", True).status == 415
    # the binary tensor data extension: only on the v2 infer routes, and only with the header length
    assert v2_schemas.check_content_type("application/octet-stream", "42", True) == 42
    assert v2_schemas.check_content_type(None, "0", True) == 0
    assert v2_schemas.check_content_type("application/json", " 7 ", True) == 7
    assert err(v2_schemas.check_content_type, "application/octet-stream").status == 415            # /predict
    e = err(v2_schemas.check_content_type, "application/octet-stream", None, True)
    assert e.status == 400 and e.field == "Inference-Header-Content-Length"
    e = err(v2_schemas.check_content_type, None, "10", False)                                      # /predict
    assert e.status == 400 and e.field == "Inference-Header-Content-Length"
    for bad in ("abc", "-1", "1.5", "", "9" * 30):
        e = err(v2_schemas.check_content_type, None, bad, True)
        assert e.status == 400 and e.field == "Inference-Header-Content-Length", bad


def test_split_body():
    assert v2_schemas.split_body(b'{"a": 1}', None) == (b'{"a": 1}', b"")
    assert v2_schemas.split_body(b'{"a": 1}\x00\x01', 8) == (b'{"a": 1}', b"\x00\x01")
    assert v2_schemas.split_body(b"{}", 2) == (b"{}", b"")
    e = err(v2_schemas.split_body, b"{}", 3)
    assert e.status == 400 and e.field == "Inference-Header-Content-Length"


def v2_binary(shape, blob: bytes, datatype="FP32", size=None, **extra):
    t = {"name": "input", "shape": shape, "datatype": datatype,
         "parameters": {"binary_data_size": len(blob) if size is None else size}}
    return {"inputs": [t], **extra}, blob


@pytest.mark.parametrize("datatype, np_dtype", [
    ("FP32", "<f4"), ("FP64", "<f8"), ("FP16", "<f2"), ("INT8", "i1"), ("INT16", "<i2"), ("INT32", "<i4"),
    ("INT64", "<i8"), ("UINT8", "u1"), ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"),
])
def test_v2_binary_inputs_match_json(datatype, np_dtype):
    values = np.arange(128).reshape(2, 8, 8) % 100
    body, blob = v2_binary([2, 8, 8], values.astype(np_dtype).tobytes(), datatype, id="b1")
    x, rid, outs = v2_schemas.parse_v2_infer(body, SPEC, None, blob)
    assert rid == "b1" and outs == ["probabilities", "label"]
    assert x.dtype == np.float32 and x.shape == (2, 64)
    want, _, _ = v2_schemas.parse_v2_infer(v2([2, 8, 8], values.reshape(-1).tolist(), datatype), SPEC)
    assert np.array_equal(x, want)
    body, blob = v2_binary([1, 64], values[0].astype(np_dtype).tobytes(), datatype)  # the flat shape too
    assert np.array_equal(v2_schemas.parse_v2_infer(body, SPEC, None, blob)[0], want[:1])


@pytest.mark.parametrize("body_blob, status, field, fragment", [
    # the declared size disagrees with the bytes that follow the JSON
    (v2_binary([1, 8, 8], np.zeros(64, "<f4").tobytes(), size=100), 400,
     "inputs[0].parameters.binary_data_size", "'input' is 100, but 256 bytes"),
    # size consistent with the body, but not shape x datatype
    (v2_binary([1, 8, 8], np.zeros(63, "<f4").tobytes()), 400,
     "inputs[0].parameters.binary_data_size", "252 bytes, shape [1, 8, 8] x FP32 needs 256"),
    (v2_binary([2, 8, 8], np.zeros(64, "<f4").tobytes()), 400, "inputs[0].parameters.binary_data_size", "needs 512"),
    (v2_binary([1, 8, 8], np.zeros(64, "<f8").tobytes(), "FP32"), 400,
     "inputs[0].parameters.binary_data_size", "needs 256"),
    (v2_binary([1, 8, 8], b"", size=-1), 400, "inputs[0].parameters.binary_data_size", "-1"),
    (v2_binary([1, 8, 8], b"", size=True), 400, "inputs[0].parameters.binary_data_size", "True"),
    (v2_binary([1, 8, 8], b"", size="256"), 400, "inputs[0].parameters.binary_data_size", "'256'"),
    ((v2([1, 8, 8], [0] * 64), b"\x00" * 4), 400, "body", "no input declares"),
    (({"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": [0] * 64,
                   "parameters": {"binary_data_size": 256}}]}, b"\x00" * 256), 400, "inputs[0].data", "together"),
    (({"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "parameters": [1]}]}, b""), 422,
     "inputs[0].parameters", "not an object"),
    # the same value checks as JSON tensors
    (v2_binary([1, 8, 8], np.array([0] * 63 + [np.nan], "<f4").tobytes()), 422, "inputs[0].data[63]", "not finite"),
    (v2_binary([1, 8, 8], np.array([0] * 63 + [1e7], "<f4").tobytes()), 422, "inputs[0].data[63]", "out of range"),
    (v2_binary([5, 8, 8], np.zeros(320, "<f4").tobytes()), 422, "inputs[0].shape", "limit 4"),
    (v2_binary([1, 8, 8], np.zeros(64, "<f4").tobytes(), "BYTES"), 422, "inputs[0].datatype", "BYTES"),
])
def test_v2_binary_inputs_rejected(body_blob, status, field, fragment):
    body, blob = body_blob
    e = err(v2_schemas.parse_v2_infer, body, SPEC, None, blob)
    assert (e.status, e.field) == (status, field) and fragment in e.message, e.to_dict()
    assert e.expected


def test_v2_binary_bytes_tensor_for_text():
    texts = ["a film", "ünïcode 🙂", "x" * 50]
    blob = v2_schemas.encode_bytes_tensor(texts)
    assert blob[:4] == (6).to_bytes(4, "little") and blob[4:10] == b"a film"
    assert v2_schemas.decode_bytes_tensor(blob, "f", 3) == [t.encode() for t in texts]
    tu = pytest.importorskip("tritonclient.utils")  # the standard client's encoding agrees byte for byte
    assert tu.serialize_byte_tensor(np.array(texts, dtype=object)).item() == blob
    body, _ = v2_binary([3], blob, "BYTES", id="t")
    assert v2_schemas.parse_v2_infer(body, TEXT, None, blob) == (texts, "t", ["probabilities", "label"])
    body, _ = v2_binary([3, 1], blob, "BYTES")
    assert v2_schemas.parse_v2_infer(body, TEXT, None, blob)[0] == texts


@pytest.mark.parametrize("shape, blob, size, status, field", [
    ([2], v2_schemas.encode_bytes_tensor(["a"]), None, 400, "inputs[0].parameters.binary_data_size"),      # 1 of 2
    ([1], v2_schemas.encode_bytes_tensor(["a", "b"]), None, 400, "inputs[0].parameters.binary_data_size"),  # 2 of 1
    ([1], v2_schemas.encode_bytes_tensor(["abc"])[:-1], None, 400, "inputs[0].parameters.binary_data_size"),
    ([1], b"\x01\x00", None, 400, "inputs[0].parameters.binary_data_size"),          # truncated length prefix
    ([1], v2_schemas.encode_bytes_tensor(["a"]), 99, 400, "inputs[0].parameters.binary_data_size"),
    ([2], b"\x00\x00\x00\x00" * 1000, None, 400, "inputs[0].parameters.binary_data_size"),  # many empty items
    ([1], b"\x02\x00\x00\x00\xff\xfe", None, 422, "inputs[0].data[0]"),           # not UTF-8
    ([2], v2_schemas.encode_bytes_tensor(["ok", " "]), None, 422, "inputs[0].data[1]"),   # whitespace only
    ([1], v2_schemas.encode_bytes_tensor(["x" * 51]), None, 422, "inputs[0].data[0]"),    # over max_text_chars
    ([5], v2_schemas.encode_bytes_tensor(["a"] * 5), None, 422, "inputs[0].shape"),       # over max_inputs
])
def test_v2_binary_bytes_rejected(shape, blob, size, status, field):
    body, blob = v2_binary(shape, blob, "BYTES", size)
    e = err(v2_schemas.parse_v2_infer, body, TEXT, None, blob)
    assert (e.status, e.field) == (status, field), e.to_dict()


def test_v2_output_plan():
    base = v2([1, 8, 8], [0] * 64)
    assert v2_schemas.v2_outputs(base) == [("probabilities", False), ("label", False)]
    assert v2_schemas.v2_outputs({**base, "parameters": {"binary_data_output": True}}) == [
        ("probabilities", True), ("label", True)]
    outs = [{"name": "label", "parameters": {"binary_data": True}}, {"name": "probabilities"}]
    assert v2_schemas.v2_outputs({**base, "outputs": outs}) == [("label", True), ("probabilities", False)]
    outs = [{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}]
    assert v2_schemas.v2_outputs({**base, "outputs": outs, "parameters": {"binary_data_output": True}}) == [
        ("label", False), ("probabilities", True)]
    for body, field in [({**base, "parameters": {"binary_data_output": 1}}, "parameters.binary_data_output"),
                        ({**base, "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]},
                         "outputs[0].parameters.binary_data"),
                        ({**base, "outputs": [{"name": "label", "parameters": True}]}, "outputs[0].parameters")]:
        e = err(v2_schemas.parse_v2_infer, body, SPEC)
        assert e.status == 422 and e.field == field, e.to_dict()


def test_v2_response_json_and_binary():
    probs = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    labels = ["pos", "neg"]
    plain, n = v2_schemas.v2_response("m", "3", "r", [("probabilities", "FP32", [2, 2], probs, False),
                                                      ("label", "BYTES", [2], labels, False)])
    assert n is None
    assert plain == (b'{"model_name":"m","model_version":"3","outputs":[{"name":"probabilities","datatype":"FP32",'
                     b'"shape":[2,2],"data":[0.25,0.75,0.5,0.5]},{"name":"label","datatype":"BYTES","shape":[2],'
                     b'"data":["pos","neg"]}],"id":"r"}')
    body, n = v2_schemas.v2_response("m", "3", None, [("probabilities", "FP32", [2, 2], probs, True),
                                                      ("label", "BYTES", [2], labels, True)])
    head = json.loads(body[:n])
    assert "id" not in head and all("data" not in o for o in head["outputs"])
    assert [o["parameters"]["binary_data_size"] for o in head["outputs"]] == [16, 14]
    assert body[n:n + 16] == probs.astype("<f4").tobytes() and len(body) == n + 30
    # the standard client decodes it
    http = pytest.importorskip("tritonclient.http")
    result = http.InferResult.from_response_body(body, header_length=n)
    assert np.array_equal(result.as_numpy("probabilities"), probs)
    assert result.as_numpy("label").tolist() == [b"pos", b"neg"]
    body, n = v2_schemas.v2_response("m", "3", None, [("probabilities", "FP32", [2, 2], probs, False),
                                                      ("label", "BYTES", [2], labels, True)])
    result = http.InferResult.from_response_body(body, header_length=n)
    assert np.allclose(result.as_numpy("probabilities"), probs) and result.as_numpy("label").tolist() == [b"pos", b"neg"]


def test_replicas_and_serve_build(tmp_path, modelworks_home, capsys):
    assert parse_replicas("1:4") == (1, 4) and parse_replicas("2") == (2, 2)
    for bad in ("4:1", "x", "0:0", "-1:2"):
        with pytest.raises(UserError):
            parse_replicas(bad)
    from modelworks.registry import Registry
    from modelworks.serve.testing import register_digits

    register_digits(Registry(), steps=5)
    out = tmp_path / "serve_config.yaml"
    assert main(["serve", "build", "digits@1", "-o", str(out), "--replicas", "1:3",
                 "--set", "max_batch_size=32"]) == 0
    cfg = yaml.safe_load(out.read_text())
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(cfg)  # what `serve deploy` validates
    assert cfg["http_options"]["host"] == "127.0.0.1"
    app = cfg["applications"][0]
    assert app["import_path"] == "modelworks.serve.app:build_app" and app["args"]["model"] == "digits@1"
    dep = app["deployments"][0]
    assert dep["autoscaling_config"]["min_replicas"] == 1 and dep["autoscaling_config"]["max_replicas"] == 3
    assert dep["max_ongoing_requests"] >= 32 and app["args"]["serve"]["max_batch_size"] == 32
    assert dep["user_config"]["model"] == "digits@1"
    # An unknown model or a bad setting is one line and exit 2, before anything is written.
    capsys.readouterr()
    assert main(["serve", "build", "nosuch", "-o", str(tmp_path / "x.yaml")]) == 2
    assert main(["serve", "build", "digits", "-o", str(tmp_path / "x.yaml"), "--set", "max_batch_size=0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    with pytest.raises(Exception):
        ServeConfig(min_replicas=3, max_replicas=2)


def test_corrupt_checkpoint_refused_before_serving(modelworks_home, capsys):
    from modelworks.registry import Registry
    from modelworks.serve.testing import register_digits

    reg = Registry()
    register_digits(reg, steps=5)
    weights = reg.checkpoint_dir("digits", 1) / "model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert main(["serve", "digits@1", "--port", "1"]) == 2
    msg = capsys.readouterr().err.strip()
    assert msg.count("\n") == 0 and "sha256" in msg and "refusing" in msg


def test_cluster_rayservice_uses_the_built_config():
    from pathlib import Path

    from ray.serve.schema import ServeDeploySchema

    from modelworks.serve.config_builder import build_config

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "rayservice-serve.yaml").read_text())
    assert doc["kind"] == "RayService"
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    built = build_config("digits@production", registry="s3://my-bucket/modelworks/registry",
                         serve_config=ServeConfig(max_replicas=4), host="0.0.0.0")
    assert served["applications"][0]["import_path"] == built["applications"][0]["import_path"]
    assert set(served["applications"][0]["deployments"][0]) == set(built["applications"][0]["deployments"][0])
    assert served["applications"][0]["args"]["serve"] == built["applications"][0]["args"]["serve"]


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False, None])
def test_v2_round_trip_with_the_triton_client_encoding(binary_in, binary_out):
    """Bodies exactly as tritonclient.http builds them (no Content-Type) -> parse -> v2_response -> its decoder."""
    http = pytest.importorskip("tritonclient.http")
    x = (np.arange(128, dtype=np.float32) % 17).reshape(2, 8, 8)
    inp = http.InferInput("input", [2, 8, 8], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outputs = None if binary_out is None else [http.InferRequestedOutput(n, binary_data=binary_out)
                                               for n in ("probabilities", "label")]
    request, json_size = http.InferenceServerClient.generate_request_body([inp], outputs=outputs, request_id="q")
    header_length = v2_schemas.check_content_type(None, None if json_size is None else str(json_size), True)
    head, binary = v2_schemas.split_body(request if isinstance(request, bytes) else request.encode(), header_length)
    got, rid, names = v2_schemas.parse_v2_infer(json.loads(head), SPEC, head, binary)
    assert np.array_equal(got, x.reshape(2, 64)) and rid == "q" and names == ["probabilities", "label"]
    plan = dict(v2_schemas.v2_outputs(json.loads(head)))
    assert plan == {"probabilities": binary_out is not False, "label": binary_out is not False}
    probs = np.array([[0.1, 0.9], [0.6, 0.4]], np.float32)
    body, n = v2_schemas.v2_response("digits", "1", rid,
                                     [("probabilities", "FP32", [2, 2], probs, plan["probabilities"]),
                                      ("label", "BYTES", [2], ["b", "a"], plan["label"])])
    result = http.InferResult.from_response_body(body, header_length=n)
    assert np.allclose(result.as_numpy("probabilities"), probs)
    assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").tolist()] == ["b", "a"]
    assert result.get_response()["id"] == "q"
