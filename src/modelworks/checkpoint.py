"""A checkpoint is one self-describing directory, and ``load`` is the one loader used everywhere
(evaluate, predict, serve, tests). It refuses a directory whose files do not match ``sha256sums``.

    model.safetensors   weights (no pickle)
    model.json          architecture spec: rebuilds the network with models.build_model
    preprocessor.json   fitted preprocessing + label map (tables: per-column statistics, categories, fills)
    tokenizer.json      text models only: the HF tokenizer fitted on the training split
    labels.json         class names in index order
    metrics.json        this epoch's metrics and the history so far
    config.json         the whole validated workflow config
    train_state.pt      optimizer state + epoch, for resume (torch.load weights_only=True)
    sha256sums          "<sha256>  <file>" per file above
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modelworks.data import preprocess
from modelworks.errors import CheckpointError
from modelworks.models import build_model

SUMS = "sha256sums"
REQUIRED = ("model.safetensors", "model.json", "preprocessor.json", "labels.json", "metrics.json", "config.json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    """sha256 over a module's tensors (names, dtypes, shapes, bytes): equal digests mean equal weights.
    Fine-tuning records the digest of the encoder it started from, so lineage can be checked by hash."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_sums(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != SUMS)
    (directory / SUMS).write_text("".join(f"{sha256(p)}  {p.name}\n" for p in files))


def verify(directory: str | Path) -> None:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint not found: {d}")
    sums_file = d / SUMS
    if not sums_file.is_file():
        raise CheckpointError(f"checkpoint {d} has no {SUMS}; it is incomplete (interrupted write?) - use another")
    listed = {}
    for line in sums_file.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    # A text checkpoint's tokenizer decides what the model reads: it must be covered like the weights.
    required = REQUIRED + (("tokenizer.json",) if (d / "tokenizer.json").exists() else ())
    for name in required:
        if name not in listed:
            raise CheckpointError(f"checkpoint {d}: {name} is not covered by {SUMS}; refusing to load it")
    for name, digest in listed.items():
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {d}: {name} is missing; restore it or use another checkpoint")
        if sha256(path) != digest:
            raise CheckpointError(f"checkpoint {d}: {name} does not match its sha256 (corrupt or modified); "
                                  f"refusing to load it - retrain or use another version")


def save(directory: str | Path, *, model: nn.Module, spec: dict, preprocessor, metrics: dict,
         config: dict, train_state: dict | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    (d / "model.json").write_text(json.dumps(spec, indent=2))
    for name, text in preprocessor.files().items():
        (d / name).write_text(text)
    (d / "labels.json").write_text(json.dumps(preprocessor.class_names))
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (d / "config.json").write_text(json.dumps(config, indent=2))
    if train_state is not None:
        torch.save(train_state, d / "train_state.pt")
    write_sums(d)
    return d


@dataclass
class LoadedModel:
    model: nn.Module
    spec: dict
    preprocessor: Any               # data/: preprocess.Preprocessor, text.TextPreprocessor, table.TablePreprocessor
    class_names: list[str]
    metrics: dict
    config: dict
    path: Path

    @property
    def task(self) -> str:
        return self.spec.get("task", "classification")

    @torch.no_grad()
    def forward(self, x_raw) -> torch.Tensor:
        """The model's output for raw inputs (images as arrays, texts, or table rows), through the saved
        preprocessor. Texts run in groups of similar length (TextPreprocessor.to_model_groups): the model's
        output for a text does not depend on the padding around it, only the work does."""
        groups = getattr(self.preprocessor, "to_model_groups", None)
        if groups is None or len(x_raw) <= 1:  # one text has no padding to save
            return self.model(self.preprocessor.to_model_input(x_raw))
        parts = [(idx, self.model(ids)) for idx, ids in groups(x_raw)]
        out = torch.empty((len(x_raw), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
        for idx, part in parts:
            out[torch.from_numpy(idx)] = part
        return out

    def predict_proba(self, x_raw) -> torch.Tensor:
        """Class probabilities for raw inputs."""
        return torch.softmax(self.forward(x_raw), dim=1)

    def predict_values(self, x_raw) -> torch.Tensor:
        """Regression: (N,) predictions in the label's units."""
        return self.preprocessor.to_label_units(self.forward(x_raw))

    def predict_outputs(self, x_raw) -> torch.Tensor:
        """What a server answers with: class probabilities (N, C), or for regression the values (N, 1)."""
        return self.predict_values(x_raw)[:, None] if self.task == "regression" else self.predict_proba(x_raw)


def load(directory: str | Path, *, verify_sums: bool = True) -> LoadedModel:
    d = Path(directory)
    if verify_sums:
        verify(d)
    try:
        spec = json.loads((d / "model.json").read_text())
        model = build_model(spec)
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        pre = preprocess.read_dir(d)
        names = json.loads((d / "labels.json").read_text())
        metrics = json.loads((d / "metrics.json").read_text())
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {d} cannot be loaded ({type(err).__name__}: {err}); "
                              f"use another checkpoint or retrain") from None
    model.eval()
    return LoadedModel(model, spec, pre, names, metrics, config, d)


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / "train_state.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


def fetch(fs: pafs.FileSystem, src: str, dst: Path) -> Path:
    """Copy the checkpoint folder ``src`` on ``fs`` (object storage, any pyarrow filesystem) to the local ``dst``,
    whole or not at all: into a private folder beside it, then renamed. Several processes on one machine may
    fetch the same checkpoint at once: a complete copy already at ``dst`` is kept, a partial one replaced."""
    if (dst / SUMS).is_file():
        return dst
    tmp = dst.parent / f".{dst.name}.fetch{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        pafs.copy_files(src, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            tmp.rename(dst)
        except OSError:  # dst is there: another process's complete copy, or a stale partial one
            if not (dst / SUMS).is_file():
                shutil.rmtree(dst, ignore_errors=True)
                tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
