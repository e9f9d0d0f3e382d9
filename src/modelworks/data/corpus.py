"""A plain-text corpus for a language model: one file, split by position (not by shuffled lines), so the
validation text is a stretch the model never saw: the first ``1 - val_fraction`` of its characters train,
the rest validate (Tiny Shakespeare: 1,003,854 and 111,540, the split char-rnn and nanoGPT report on).

A file of a megabyte or so is read on the driver and handed to the training workers through Ray's object
store as token ids: a Ray Data pipeline would cost seconds to start for what one read does in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import torch

from modelworks.config import DataConfig
from modelworks.errors import DataError

DEFAULT_FILE = "input.txt"
# Larger files need a streaming reader; the whole text is held in memory (and once per worker as ids).
MAX_BYTES = 512 << 20


@dataclass
class Corpus:
    path: str
    train: str
    val: str


def corpus_path(cfg: DataConfig, root: Path) -> str:
    return cfg.path or str(root / cfg.name / DEFAULT_FILE)


def read_corpus(cfg: DataConfig, root: Path, context: int) -> Corpus:
    """The file (local path or any pyarrow filesystem URI), decoded as UTF-8 and split by position."""
    path = corpus_path(cfg, root)
    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(),
                                                                                 str(Path(path).resolve()))
        info = fs.get_file_info(inner)
        if info.type != pyarrow.fs.FileType.File:
            raise FileNotFoundError(path)
        if info.size > MAX_BYTES:
            raise DataError(f"corpus {path} is {info.size:,} bytes; at most {MAX_BYTES:,} are read into memory "
                            f"(split it, or train on a part)")
        with fs.open_input_stream(inner) as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"corpus not found: {path}; set data.path (or --data-dir with {cfg.name}/{DEFAULT_FILE} "
                        f"inside)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"corpus {path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if cfg.max_rows:  # smoke runs: the first N characters
        text = text[: cfg.max_rows]
    cut = int(len(text) * (1 - cfg.val_fraction))
    train, val = text[:cut], text[cut:]
    if min(len(train), len(val)) <= context + 1:
        raise DataError(f"corpus {path}: {len(train):,} training and {len(val):,} validation characters; each part "
                        f"needs more than model.max_len+1 = {context + 1} (use a longer text or a shorter max_len)")
    return Corpus(path, train, val)


def windows(ids: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ids[s : s+context] and next-token targets ids[s+1 : s+context+1] for each start s: (B, context)."""
    offsets = torch.arange(context)
    index = torch.as_tensor(starts)[:, None] + offsets
    return ids[index], ids[index + 1]
