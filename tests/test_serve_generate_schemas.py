"""/generate request validation, without Ray or HTTP (fast)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from modelworks.config import ServeConfig
from modelworks.serve.generate_schemas import (GenerateParams, GenerateRequest, GenerateResponse, GenerateSpec,
                                               parse_generate, wrong_endpoint)
from modelworks.serve.schemas import InputError

SPEC = GenerateSpec("\n !,.:;?ABCDEIMNORSTUabcdefghilmnorstuvwy", max_prompt_chars=20, max_new_tokens=50)


def err(body, spec=SPEC) -> InputError:
    with pytest.raises(InputError) as info:
        parse_generate(body, spec)
    return info.value


def test_defaults_and_a_full_body():
    assert parse_generate({"prompt": "ROMEO:"}, SPEC) == GenerateParams("ROMEO:", 50, 1.0, None, None, False)
    wide = GenerateSpec(SPEC.chars, 20, 1000)
    assert parse_generate({"prompt": "ROMEO:"}, wide).max_new_tokens == 200  # the default, under the limit
    body = {"prompt": "a", "max_new_tokens": 50, "temperature": 0, "top_k": SPEC.vocab_size, "seed": 0,
            "stream": True}
    assert parse_generate(body, SPEC) == GenerateParams("a", 50, 0.0, SPEC.vocab_size, 0, True)
    p = parse_generate({"prompt": "\n" * 20, "temperature": 2, "top_k": None, "seed": None, "max_new_tokens": 1},
                       SPEC)
    assert (p.prompt, p.temperature, p.max_new_tokens) == ("\n" * 20, 2.0, 1)


@pytest.mark.parametrize("body, field, fragment", [
    ({}, "prompt", "missing"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "a" * 21}, "prompt", "limit 20"),
    ({"prompt": 5}, "prompt", "not a string"),
    ({"prompt": None}, "prompt", "null"),
    ({"prompt": ["a"]}, "prompt", "not a string"),
    ({"prompt": "ROMEO: héllo"}, "prompt", "'é'"),
    ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens", "out of range"),
    ({"prompt": "a", "max_new_tokens": 51}, "max_new_tokens", "out of range"),
    ({"prompt": "a", "max_new_tokens": -3}, "max_new_tokens", "out of range"),
    ({"prompt": "a", "max_new_tokens": 5.0}, "max_new_tokens", "not an integer"),
    ({"prompt": "a", "max_new_tokens": "5"}, "max_new_tokens", "not an integer"),
    ({"prompt": "a", "max_new_tokens": True}, "max_new_tokens", "bool"),
    ({"prompt": "a", "max_new_tokens": None}, "max_new_tokens", "null"),
    ({"prompt": "a", "temperature": -1}, "temperature", "out of range"),
    ({"prompt": "a", "temperature": 3}, "temperature", "out of range"),
    ({"prompt": "a", "temperature": 2.0001}, "temperature", "out of range"),
    ({"prompt": "a", "temperature": "hot"}, "temperature", "not a number"),
    ({"prompt": "a", "temperature": None}, "temperature", "null"),
    ({"prompt": "a", "temperature": False}, "temperature", "bool"),
    ({"prompt": "a", "top_k": 0}, "top_k", "out of range"),
    ({"prompt": "a", "top_k": SPEC.vocab_size + 1}, "top_k", "out of range"),
    ({"prompt": "a", "top_k": 2.5}, "top_k", "not an integer"),
    ({"prompt": "a", "seed": -1}, "seed", "out of range"),
    ({"prompt": "a", "seed": 1 << 63}, "seed", "out of range"),
    ({"prompt": "a", "seed": "7"}, "seed", "not an integer"),
    ({"prompt": "a", "stream": "yes"}, "stream", "not a boolean"),
    ({"prompt": "a", "stream": 1}, "stream", "not a boolean"),
    ({"prompt": "a", "top_p": 0.9}, "top_p", "not a known field"),
])
def test_bad_parameters_are_422_naming_the_field(body, field, fragment):
    e = err(body)
    assert e.status == 422 and e.field == field, e.to_dict()
    d = e.to_dict()
    assert d["error"].startswith(f"{field}: ") and fragment in d["error"], d
    assert "\n" not in d["error"] and set(d) == {"error", "field", "expected", "status"}


def test_unknown_characters_are_named_once_each_in_order():
    e = err({"prompt": "ROMEO: 日本 é日 ~"})
    assert e.field == "prompt" and "'日本é~'" in e.message and "vocabulary" in e.message
    assert repr(SPEC.chars) in e.expected  # a small vocabulary is shown whole


@pytest.mark.parametrize("body", [[], "ROMEO:", None, 3])
def test_body_must_be_an_object(body):
    e = err(body)
    assert e.status == 422 and e.field == "body"


def test_wrong_endpoint_is_one_line_saying_where_to_go():
    lm = wrong_endpoint("shakespeare@2", True, "/predict").to_dict()
    assert lm["status"] == 400 and "POST /generate" in lm["error"] and "shakespeare@2" in lm["error"]
    clf = wrong_endpoint("digits@1", False, "/generate").to_dict()
    assert clf["status"] == 400 and "POST /predict" in clf["error"] and "not a language model" in clf["error"]
    assert "\n" not in lm["error"] + clf["error"]


def test_openapi_models_and_config_defaults():
    props = GenerateRequest.model_json_schema()["properties"]
    assert set(props) == {"prompt", "max_new_tokens", "temperature", "top_k", "seed", "stream"}
    assert props["temperature"]["maximum"] == 2 and props["max_new_tokens"]["default"] == 200
    assert set(GenerateResponse.model_json_schema()["properties"]) == {"model", "prompt", "text", "tokens"}
    cfg = ServeConfig()
    assert (cfg.max_prompt_chars, cfg.max_new_tokens) == (1000, 1000)
    with pytest.raises(ValueError):
        ServeConfig(max_new_tokens=0)


def test_module_is_pure():
    code = ("import sys, modelworks.serve.generate_schemas; "
            "print(sorted(m for m in ('ray', 'torch', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
