"""The preprocessor: fitted on the training split only, applied with vectorised ``map_batches``.

Fitted state (mean/std of the inputs, the label map, class names) is plain JSON and is saved in every
checkpoint, so evaluation and serving apply exactly what training saw.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from modelworks.errors import DataError

if TYPE_CHECKING:  # only annotations: loading a checkpoint (serving, `modelworks generate`) never imports Ray
    import ray


class JsonFields:
    """A preprocessor (a dataclass) whose fitted state is its fields: saved whole as preprocessor.json."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def files(self) -> dict[str, str]:
        """What a checkpoint stores for this preprocessor."""
        return {"preprocessor.json": self.to_json()}


@dataclass
class Preprocessor(JsonFields):
    input_shape: list[int]          # shape of one input before flattening, e.g. [28, 28]
    mean: float
    std: float
    classes: list                   # raw label values in index order (the label map)
    class_names: list[str] = field(default_factory=list)
    raw_column = "x"                # the source column this preprocessor reads

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- applying --------------------------------------------------------------------------------
    def transform_features(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs (B, *input_shape) or (B, input_dim) -> normalised float32 (B, input_dim)."""
        x = np.asarray(x, dtype=np.float32).reshape(len(x), self.input_dim)
        return (x - np.float32(self.mean)) / np.float32(self.std)

    def to_model_input(self, x_raw) -> torch.Tensor:
        return torch.from_numpy(self.transform_features(x_raw))

    def encode_labels(self, labels: np.ndarray) -> np.ndarray:
        lookup = {str(c): i for i, c in enumerate(self.classes)}
        try:
            return np.array([lookup[str(v)] for v in labels], dtype=np.int64)
        except KeyError as err:
            raise DataError(f"label {err.args[0]!r} was not seen in the training split "
                            f"(known: {self.classes[:20]}); check the label column") from None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The map_batches function: {x, label} -> {x: float32 (B, D), y: int64 (B,)}."""
        return {"x": self.transform_features(batch["x"]), "y": self.encode_labels(batch["label"])}

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(self, batch_format="numpy", batch_size=4096)

    @classmethod
    def from_json(cls, text: str) -> "Preprocessor":
        return cls(**json.loads(text))


def from_json(text: str):
    """An image ``Preprocessor``, a ``TextPreprocessor`` (``"kind": "text"``), a ``TablePreprocessor``
    (``"kind": "table"``) or a language model's ``CharPreprocessor`` (``"kind": "chars"``), from its ``to_json``."""
    data = json.loads(text)
    if data.get("kind") == "text":
        from modelworks.data.text import TextPreprocessor

        return TextPreprocessor.from_dict(data)
    if data.get("kind") == "table":
        from modelworks.data.table import TablePreprocessor

        return TablePreprocessor.from_dict(data)
    if data.get("kind") == "chars":
        from modelworks.data.chars import CharPreprocessor

        return CharPreprocessor.from_dict(data)
    return Preprocessor(**data)


def read_dir(directory: Path):
    """The preprocessor a checkpoint directory holds (a text one also reads its ``tokenizer.json``)."""
    text = (directory / "preprocessor.json").read_text()
    if json.loads(text).get("kind") == "text":
        from modelworks.data.text import TOKENIZER_FILE, TextPreprocessor

        return TextPreprocessor.from_dict(json.loads(text), (directory / TOKENIZER_FILE).read_text())
    return from_json(text)


def _partial_stats(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = np.asarray(batch["x"], dtype=np.float64).reshape(len(batch["x"]), -1)
    return {"n": np.array([x.size]), "s": np.array([x.sum()]), "ss": np.array([(x * x).sum()]),
            "rows": np.array([len(x)])}


def fit(train: ray.data.Dataset, class_names: dict[str, str], input_shape: list[int] | None) -> Preprocessor:
    """One streaming pass over the training split; only per-block sums come back to the driver."""
    parts = train.map_batches(_partial_stats, batch_format="numpy", batch_size=4096).take_all()
    sums = [sum(float(p[k]) for p in parts) for k in ("n", "s", "ss")]
    classes = train.unique("label")
    if input_shape is None and sums[0]:
        input_shape = list(np.asarray(train.take(1)[0]["x"]).shape)
    return _from_stats(*sums, classes, class_names, input_shape)


def fit_arrays(x: np.ndarray, labels: np.ndarray, class_names: dict[str, str]) -> Preprocessor:
    """The same fit for a training split already on the driver (``sources.IN_MEMORY_MAX_BYTES``)."""
    stats = _partial_stats({"x": x})
    return _from_stats(*(float(stats[k][0]) for k in ("n", "s", "ss")), list(np.unique(labels)), class_names,
                       list(x.shape[1:]))


def _from_stats(n: float, s: float, ss: float, classes: list, class_names: dict[str, str],
                input_shape: list[int] | None) -> Preprocessor:
    if n == 0:
        raise DataError("the training split is empty; check the data path, data.max_rows and data.val_fraction")
    mean = s / n
    std = max((ss / n - mean * mean) ** 0.5, 1e-6)
    classes = sorted(classes, key=lambda v: (isinstance(v, str), v))
    if len(classes) < 2:
        raise DataError(f"the training split has {len(classes)} class(es); need at least 2")
    names = [class_names.get(str(c), str(c)) for c in classes]
    classes = [c.item() if hasattr(c, "item") else c for c in classes]
    return Preprocessor(list(input_shape), mean, std, classes, names)
