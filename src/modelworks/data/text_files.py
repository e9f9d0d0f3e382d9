"""Text datasets in Ray Data: labelled sentences (CSV, TSV, JSONL, Parquet, one sentence per line; local paths
or pyarrow URIs, compressed or not) read into rows {text, label, file, row}, so that a bad row is named by
file and row number. A dataset that ships its own splits (SST-2: train/validation/test.csv.gz) uses them; a
split it lacks is carved from the training file by a keyed hash of each text, as sources.split_codes does
for arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from modelworks.config import DataConfig
from modelworks.data.sources import SPLITS, Source, text_split_codes
from modelworks.errors import DataError

# File suffix -> reader format; ".gz" etc. are unpacked on the fly by pyarrow's stream.
_TEXT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                 ".txt": "lines"}
# What a dataset that ships its own splits calls them (SST-2: train/validation/test.csv.gz).
_SPLIT_FILES = {"train": ("train",), "val": ("validation", "val", "dev"), "test": ("test",)}


def _text_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for packed in (".gz", ".bz2", ".zst"):
        name = name.removesuffix(packed)
    return _TEXT_FORMATS.get(Path(name).suffix, "csv")


def _read_text_rows(batch: dict, cfg: DataConfig, labelled: bool) -> dict:
    """Read whole files (one Ray task each) into rows {text, label, file, row}; rows are numbered from 1
    as a person counts data rows, so an error can name the exact one."""
    import pandas as pd
    import pyarrow.fs as pafs

    texts, labels, files, rows = [], [], [], []
    for path, fmt in zip(batch["path"], batch["format"]):
        fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        try:
            with fs.open_input_stream(inner, compression="detect") as f:
                if fmt == "lines":
                    frame = pd.DataFrame({cfg.text_column: [ln for ln in f.read().decode("utf-8").splitlines()
                                                            if ln.strip()]})
                elif fmt == "parquet":
                    import pyarrow.parquet as pq

                    frame = pq.read_table(f).to_pandas()
                elif fmt == "jsonl":
                    frame = pd.read_json(f, lines=True, dtype=False)
                else:
                    frame = pd.read_csv(f, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False,
                                        quoting=3 if fmt == "tsv" else 0)
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read {path} as {fmt}: {err}; check data.path and data.format") from None
        need = [cfg.text_column] + ([cfg.label_column] if labelled else [])
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: no column '{missing[0]}' (columns: {', '.join(map(str, frame.columns))}); "
                            f"set data.text_column / data.label_column")
        for i, text in enumerate(frame[cfg.text_column].tolist(), start=1):
            if not isinstance(text, str):
                raise DataError(f"{path} row {i}: text is {type(text).__name__}, not a string; fix the row or "
                                f"point data.text_column at the text")
            if not text.strip():
                raise DataError(f"{path} row {i}: text is empty; remove the row or fill it in")
        if labelled:
            for i, label in enumerate(frame[cfg.label_column].tolist(), start=1):
                if label is None or (isinstance(label, float) and label != label) or str(label).strip() == "":
                    raise DataError(f"{path} row {i}: label is missing; remove the row or label it")
            labels += [str(v).strip() for v in frame[cfg.label_column].tolist()]
        texts += frame[cfg.text_column].tolist()
        files += [path] * len(frame)
        rows += range(1, len(frame) + 1)
    out = {"text": np.array(texts, dtype=object), "file": np.array(files, dtype=object),
           "row": np.array(rows, dtype=np.int64)}
    if labelled:
        out["label"] = np.array(labels, dtype=object)
    return out


def read_text_files(paths: list[str], cfg: DataConfig, labelled: bool = True, fmt: str | None = None) -> ray.data.Dataset:
    """Rows {text, label, file, row} from text files (local paths or pyarrow URIs), one read task per file."""
    for p in paths:
        if "://" not in p and not Path(p).is_file():
            raise DataError(f"text file not found: {p}; check data.path / pretrain.corpus or --data-dir")
    items = [{"path": p, "format": fmt or _text_format(p, cfg.format)} for p in paths]
    return ray.data.from_items(items).map_batches(_read_text_rows, batch_size=1, batch_format="numpy",
                                                  fn_kwargs={"cfg": cfg, "labelled": labelled})


def _keep_text(batch: dict, split: str, cfg: DataConfig, carve_val: bool, carve_test: bool) -> dict:
    mask = text_split_codes(batch["text"], cfg, carve_val, carve_test) == SPLITS.index(split)
    return {k: v[mask] for k, v in batch.items()}


def _shipped_split(folder: Path, split: str) -> str | None:
    for stem in _SPLIT_FILES[split]:
        for found in sorted(folder.glob(f"{stem}.*")):
            name = found.name.removesuffix(".gz").removesuffix(".bz2").removesuffix(".zst")
            if Path(name).suffix in _TEXT_FORMATS:
                return str(found)
    return None


def text_source(cfg: DataConfig, root: Path) -> Source:
    """Labelled sentences. Splits the dataset ships are used as they are; missing ones are carved from
    the training file by a keyed hash of each text (the same text always lands in the same split)."""
    if cfg.path:
        paths = {"train": cfg.path, "val": cfg.val_path, "test": cfg.test_path}
        folder = Path(cfg.path).parent if "://" not in cfg.path else None
    else:
        folder = root / cfg.name
        if not folder.is_dir():
            raise DataError(f"no data for '{cfg.name}' in {folder}; set MODELWORKS_DATA_DIR or --data-dir to the "
                            f"folder holding {cfg.name}/, or set data.path")
        paths = {s: _shipped_split(folder, s) for s in SPLITS}
        if not paths["train"]:
            raise DataError(f"{folder} has no train.* file; set data.path to the training file")
    base = read_text_files([paths["train"]], cfg)
    if cfg.max_rows:
        base = base.limit(cfg.max_rows)
    carve = {"carve_val": paths["val"] is None, "carve_test": paths["test"] is None}
    # A dataset that ships its validation and test splits trains on all of its training file.
    splits = {"train": base if not any(carve.values()) else base.map_batches(
        _keep_text, batch_format="numpy", fn_kwargs={"split": "train", "cfg": cfg, **carve})}
    for split in ("val", "test"):
        if paths[split]:
            splits[split] = read_text_files([paths[split]], cfg)
        else:
            splits[split] = base.map_batches(_keep_text, batch_format="numpy",
                                             fn_kwargs={"split": split, "cfg": cfg, **carve})
    names_file = folder / "labels.txt" if folder else None
    names = {}
    if names_file and names_file.is_file():
        names = {str(i): n for i, n in enumerate(n for n in names_file.read_text().splitlines() if n)}
    return Source(splits, names, None)
