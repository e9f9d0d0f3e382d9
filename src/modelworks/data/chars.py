"""A character vocabulary for language models: every distinct character of the training text is one
token, as char-rnn and nanoGPT's Shakespeare example do (65 for Tiny Shakespeare).

Fitted on the training part only and saved in every checkpoint as ``preprocessor.json``
(``{"kind": "chars", "chars": "<the characters in id order>"}``). A character the vocabulary does not hold
is refused with the characters named, never silently replaced: a prompt must mean what it says.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from modelworks.errors import DataError


@dataclass
class CharPreprocessor:
    chars: str                      # the vocabulary: id i is chars[i]
    kind: str = "chars"
    raw_column = "text"
    classes: list = field(default_factory=list)       # a language model has no label map
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def num_classes(self) -> int:
        return 0

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` outside the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._ids))

    def encode(self, text: str) -> np.ndarray:
        """Text -> token ids (int64). Raises DataError naming any character the vocabulary lacks."""
        missing = self.unknown(text)
        if missing:
            raise DataError(f"characters {''.join(missing)!r} are not in the model's vocabulary "
                            f"({self.vocab_size} characters fitted on its training text); remove or replace them")
        return np.fromiter((self._ids[c] for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_model_input(self, texts) -> torch.Tensor:
        """Equal-length texts -> ids (B, T)."""
        return torch.from_numpy(np.stack([self.encode(t) for t in texts]))

    # -- persistence -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "chars": self.chars, "vocab_size": self.vocab_size})

    def files(self) -> dict[str, str]:
        return {"preprocessor.json": self.to_json()}

    @classmethod
    def from_dict(cls, meta: dict) -> "CharPreprocessor":
        return cls(str(meta["chars"]))


def fit(text: str) -> CharPreprocessor:
    """The vocabulary of ``text``: its distinct characters, sorted (so the same text gives the same ids)."""
    if not text:
        raise DataError("the training text is empty; point data.path at a non-empty UTF-8 text file")
    return CharPreprocessor("".join(sorted(set(text))))
