"""``POST /generate`` for language models: the request, the response and their validation. Pure: no Ray, no
HTTP, no torch (``modelworks generate`` checks its options with the same ``parse_generate``).

Body (JSON object)::

    {"prompt": "ROMEO:",          required: 1..serve.max_prompt_chars characters, each in the model's vocabulary
     "max_new_tokens": 200,       1..serve.max_new_tokens (default 200, or the limit when that is lower)
     "temperature": 1.0,          0..2; 0 = greedy (always the most likely next character)
     "top_k": null,               null, or 1..vocab size: sample from the k most likely characters only
     "seed": null,                null, or an integer 0..2^63-1: the same seed gives the same text
     "stream": false}             true: a chunked text/plain answer, the new characters as they are produced

Answer: ``{"model": "name@version", "prompt": ..., "text": <the generated characters only>, "tokens": n}``, or with
``stream`` the new characters themselves (the model in the ``X-Model`` header). A problem raises
``InputError`` (the app's one error shape, 422 naming the field).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from modelworks.serve.schemas import InputError

DEFAULT_MAX_NEW_TOKENS = 200
MAX_TEMPERATURE = 2.0
MAX_SEED = (1 << 63) - 1
FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "seed", "stream")
MODEL_HEADER = "X-Model"


@dataclass(frozen=True)
class GenerateSpec:
    """What a language model's /generate accepts: its vocabulary (the characters, in id order) and the
    server's limits."""
    chars: str
    max_prompt_chars: int
    max_new_tokens: int

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def default_new_tokens(self) -> int:
        return min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens)


@dataclass(frozen=True)
class GenerateParams:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    seed: int | None
    stream: bool


# -- pydantic models: documentation (OpenAPI at /docs) and the response shape ------------------------------
class GenerateRequest(BaseModel):
    """Generate text after `prompt` with a language model (character-level: one token = one character)."""
    prompt: str = Field(..., min_length=1, description="the text to continue: 1..serve.max_prompt_chars characters, "
                                                       "each in the model's vocabulary")
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, description="characters to generate "
                                                                          "(1..serve.max_new_tokens)")
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, description="sampling temperature; 0 = greedy")
    top_k: int | None = Field(None, ge=1, description="sample from the k most likely characters only "
                                                      "(1..vocabulary size); null = all")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random seed: the same seed, prompt and "
                                                                  "parameters give the same text; null = random")
    stream: bool = Field(False, description="true: answer text/plain, chunked, the new characters as they are "
                                            "generated (model in the X-Model header)")


class GenerateResponse(BaseModel):
    model: str = Field(..., description="name@version of the model that generated the text")
    prompt: str
    text: str = Field(..., description="the generated characters only (not the prompt)")
    tokens: int = Field(..., description="number of generated tokens (characters)")


# -- validation --------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return "null" if value is None else "bool" if isinstance(value, bool) else type(value).__name__


def _int(body: dict, key: str, default: Any, lo: int, hi: int | None, nullable: bool, expected: str) -> int | None:
    value = body.get(key, default)
    if value is None and nullable:
        return None
    # JSON true/false are not numbers here, and 5.0 is not an integer (a silent rounding would hide a bug).
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(422, key, f"got {_type_name(value)}, not an integer", expected)
    if value < lo or (hi is not None and value > hi):
        raise InputError(422, key, f"is {value}, out of range", expected)
    return value


def _prompt(body: dict, spec: GenerateSpec) -> str:
    limit = spec.max_prompt_chars
    expected = f"a string of 1..{limit} characters from the model's vocabulary"
    if "prompt" not in body:
        raise InputError(422, "prompt", "is missing", expected)
    value = body["prompt"]
    if not isinstance(value, str):
        raise InputError(422, "prompt", f"got {_type_name(value)}, not a string", expected)
    if not value:
        raise InputError(422, "prompt", "is empty", expected)
    if len(value) > limit:
        raise InputError(422, "prompt", f"is {len(value)} characters (limit {limit})", expected)
    known = set(spec.chars)
    unknown = list(dict.fromkeys(c for c in value if c not in known))
    if unknown:
        shown = "".join(unknown[:20]) + ("..." if len(unknown) > 20 else "")
        vocab = repr(spec.chars) if len(spec.chars) <= 100 else f"{spec.vocab_size} characters"
        raise InputError(422, "prompt", f"has characters {shown!r} that are not in the model's vocabulary "
                                        f"({spec.vocab_size} characters)",
                         f"a prompt made only of the model's characters: {vocab}")
    return value


def parse_generate(body: Any, spec: GenerateSpec) -> GenerateParams:
    """A /generate JSON body -> GenerateParams. Raises InputError (422) naming the first bad field."""
    if not isinstance(body, dict):
        raise InputError(422, "body", f"is a JSON {_type_name(body)}, not an object",
                         '{"prompt": "...", "max_new_tokens": N, ...} (see /docs)')
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InputError(422, unknown[0], "is not a known field", f"only {', '.join(FIELDS)}")
    prompt = _prompt(body, spec)
    n = _int(body, "max_new_tokens", spec.default_new_tokens, 1, spec.max_new_tokens, False,
             f"an integer 1..{spec.max_new_tokens}")
    t = body.get("temperature", 1.0)
    t_expected = f"a number 0..{MAX_TEMPERATURE:g} (0 = greedy)"
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise InputError(422, "temperature", f"got {_type_name(t)}, not a number", t_expected)
    if not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
        raise InputError(422, "temperature", f"is {t!r}, out of range", t_expected)
    top_k = _int(body, "top_k", None, 1, spec.vocab_size, True, f"null or an integer 1..{spec.vocab_size}")
    seed = _int(body, "seed", None, 0, MAX_SEED, True, "null or an integer 0..2^63-1")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InputError(422, "stream", f"got {_type_name(stream)}, not a boolean", "true or false")
    return GenerateParams(prompt, n, float(t), top_k, seed, stream)


def wrong_endpoint(model: str, language_model: bool, endpoint: str) -> InputError:
    """A request for the other kind of model: a language model at /predict or v2 infer, or a classifier
    (or regression model) at /generate. One line saying which endpoint to use."""
    if language_model:
        return InputError(400, "endpoint", f"{model} is a language model; {endpoint} does not serve it, "
                                           f"POST /generate does", "POST /generate with {\"prompt\": ...}")
    return InputError(400, "endpoint", f"{model} is not a language model; /generate does not serve it, "
                                       f"POST /predict (or /v2/models/{{name}}/infer) does",
                      "POST /predict with {\"input\": ...}")
