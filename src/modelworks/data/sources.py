"""Ray Data sources. Each returns streaming datasets with two columns: ``x`` (raw features, one array
per row) and ``label`` (raw label value), for the train, val and test splits. Tables read column by column
(``tabular_source``) keep their named feature columns instead of ``x``, with the label renamed ``label``.

Splits are decided row by row from a keyed hash of the row's bytes (the key: ``data.split_seed``), so a
split is reproducible, needs no global shuffle or collect, and identical rows always land together.
The test split comes from its own files when the dataset has them (MNIST), else is carved the same way.
Text datasets (sentences and labels from CSV/TSV/JSONL/Parquet/lines files) are read by text_files.py.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import ray

from modelworks.config import SKLEARN_TABLES, DataConfig, is_tabular
from modelworks.data import idx
from modelworks.errors import DataError

SPLITS = ("train", "val", "test")
# Rows per read task: small enough that Ray Data streams, large enough that task overhead stays small.
_ROWS_PER_BLOCK = 10_000
# Image sources whose raw arrays fit this (digits: 115 KB; MNIST: 47 MB of uint8) are read once on the driver:
# splitting, fitting the preprocessor and scoring the test split then need no Ray Data pass (each pass costs
# seconds to start on a small machine, more than these datasets take to read). Training gets them through the
# object store (train.run_trainer); larger datasets stream from their files through Ray Data.
IN_MEMORY_MAX_BYTES = 256 * 2**20


@dataclass
class Source:
    splits: Mapping[str, ray.data.Dataset]
    class_names: dict[str, str]  # raw label (as str) -> display name, when the dataset names its classes
    image_shape: list[int] | None
    roles: dict[str, str] | None = None  # tables: feature column -> numeric/categorical (data/table.py)
    # Read on the driver (IN_MEMORY_MAX_BYTES): split -> {"x", "label"} arrays, the same rows as ``splits``.
    arrays: dict[str, dict[str, np.ndarray]] | None = None


def data_dir(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("MODELWORKS_DATA_DIR") or Path.home() / ".modelworks" / "data")


def split_codes(x: np.ndarray, split_seed: int, val_fraction: float, test_fraction: float | None) -> np.ndarray:
    """0 = train, 1 = val, 2 = test for each row, from a keyed blake2b hash of its bytes."""
    key = split_seed.to_bytes(8, "little", signed=True)
    rows = np.ascontiguousarray(x).reshape(len(x), -1)
    u = np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), key=key, digest_size=8).digest(), "little")
                  for r in rows], dtype=np.float64) / 2.0**64
    codes = np.zeros(len(x), dtype=np.int8)
    if test_fraction is not None:
        codes[u < test_fraction] = 2
        u = np.where(u < test_fraction, 1.0, (u - test_fraction) / (1 - test_fraction))
    codes[u < val_fraction] = 1
    return codes


def text_split_codes(texts, cfg: DataConfig, carve_val: bool, carve_test: bool) -> np.ndarray:
    """As split_codes, over each string's UTF-8 bytes (a sentence, a table row's values): only the splits a
    dataset does not ship are carved."""
    key = cfg.split_seed.to_bytes(8, "little", signed=True)
    u = np.array([int.from_bytes(hashlib.blake2b(str(t).encode(), key=key, digest_size=8).digest(), "little")
                  for t in texts], dtype=np.float64) / 2.0**64
    codes = np.zeros(len(texts), dtype=np.int8)
    if carve_test:
        codes[u < cfg.test_fraction] = 2
        u = np.where(u < cfg.test_fraction, 1.0, (u - cfg.test_fraction) / (1 - cfg.test_fraction))
    if carve_val:
        codes[u < cfg.val_fraction] = 1
    return codes


def _keep(batch: dict, split: str, cfg: DataConfig, carve_test: bool) -> dict:
    codes = split_codes(batch["x"], cfg.split_seed, cfg.val_fraction, cfg.test_fraction if carve_test else None)
    mask = codes == SPLITS.index(split)
    return {k: v[mask] for k, v in batch.items()}


def _ranges(n: int, max_rows: int | None = None) -> list[dict]:
    n = min(n, max_rows) if max_rows else n
    return [{"start": s, "stop": min(s + _ROWS_PER_BLOCK, n)} for s in range(0, n, _ROWS_PER_BLOCK)]


def arrays_dataset(columns: dict[str, np.ndarray]) -> ray.data.Dataset:
    """Arrays already on the driver as a Ray Dataset (in the object store, blocks of _ROWS_PER_BLOCK rows);
    a column of rows with more than one value becomes a tensor column."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    n = len(next(iter(columns.values())))

    def column(a: np.ndarray):
        return ArrowTensorArray.from_numpy(np.ascontiguousarray(a)) if a.ndim > 1 else a

    blocks = [pa.table({k: column(v[i:i + _ROWS_PER_BLOCK]) for k, v in columns.items()})
              for i in range(0, max(n, 1), _ROWS_PER_BLOCK)]
    return ray.data.from_arrow(blocks)


class ArraySplits(Mapping):
    """Split -> Ray Dataset over arrays already on the driver, each made on first use: the image pipeline reads
    the arrays themselves (preprocess, train, evaluate), and putting them in the object store costs ~0.8 s on 2
    cores that a digits run would spend for nothing."""

    def __init__(self, arrays: dict[str, dict[str, np.ndarray]]):
        self._arrays, self._made = arrays, {}

    def __getitem__(self, split: str) -> ray.data.Dataset:
        if split not in self._made:
            self._made[split] = arrays_dataset(self._arrays[split])
        return self._made[split]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def in_memory_source(x: np.ndarray, label: np.ndarray, cfg: DataConfig, class_names: dict[str, str],
                     test: tuple[np.ndarray, np.ndarray] | None = None) -> Source:
    """Split arrays read on the driver (by the same keyed hash as the streaming path, so the same rows land
    in the same split either way); the test split is carved too unless the dataset ships its own."""
    if cfg.max_rows:
        x, label = x[:cfg.max_rows], label[:cfg.max_rows]
    codes = split_codes(x, cfg.split_seed, cfg.val_fraction, cfg.test_fraction if test is None else None)
    arrays = {s: {"x": x[codes == i], "label": label[codes == i]} for i, s in enumerate(SPLITS)}
    if test is not None:
        arrays["test"] = {"x": test[0], "label": test[1]}
    return Source(ArraySplits(arrays), class_names, list(x.shape[1:]), arrays=arrays)


# ---------------------------------------------------------------------------------------------- digits
def sklearn_data_folder() -> Path:
    """Where scikit-learn keeps the tables it ships, found without importing it (that import takes ~1.3 s on 2
    cores: a digits run reads one 60 KB file, and imports scikit-learn later, for its metrics, while it waits)."""
    return Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets" / "data"


def digits_source(cfg: DataConfig) -> Source:
    """scikit-learn's digits: 1,797 8x8 images, one CSV row each (64 pixels, then the label), the file
    ``sklearn.datasets.load_digits`` reads, read as it does (tests/test_data_ray.py checks they agree)."""
    table = np.loadtxt(sklearn_data_folder() / "digits.csv.gz", delimiter=",")
    images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    return in_memory_source(images.astype(np.float32), target.astype(np.int64), cfg,
                            {str(i): str(i) for i in range(10)})


# ------------------------------------------------------------------------------------------------- idx
def _read_idx(batch: dict, pair: idx.IdxPair) -> dict:
    xs, ys = [], []
    for s, e in zip(batch["start"], batch["stop"]):
        xs.append(idx.read_rows(pair.images, int(s), int(e)))
        ys.append(idx.read_rows(pair.labels, int(s), int(e)).astype(np.int64))
    return {"x": np.concatenate(xs), "label": np.concatenate(ys)}


def idx_source(cfg: DataConfig, root: Path) -> Source:
    folder = Path(cfg.path) if cfg.path else root / cfg.name
    pairs = {split: idx.open_split(folder, cfg.name, split, cfg.download, check_sizes=False)
             for split in ("train", "test")}
    names_file = folder / "labels.txt"
    names = names_file.read_text().split("\n") if names_file.is_file() else [str(i) for i in range(10)]
    class_names = {str(i): n for i, n in enumerate(n for n in names if n)}
    size = sum(int(np.prod(p.images.dims)) for p in pairs.values())  # uint8 pixels
    if size <= IN_MEMORY_MAX_BYTES:  # read whole, each file's length checked as it is read
        read = {s: (idx.read_all(p.images), idx.read_all(p.labels).astype(np.int64)) for s, p in pairs.items()}
        return in_memory_source(*read["train"], cfg, class_names, test=read["test"])
    for p in pairs.values():  # streamed by Ray Data below: checked whole first, so a bad file fails now
        p.check_sizes()
    train_all = ray.data.from_items(_ranges(pairs["train"].rows, cfg.max_rows)).map_batches(
        _read_idx, batch_size=1, fn_kwargs={"pair": pairs["train"]})
    splits = {s: train_all.map_batches(_keep, fn_kwargs={"split": s, "cfg": cfg, "carve_test": False})
              for s in ("train", "val")}
    splits["test"] = ray.data.from_items(_ranges(pairs["test"].rows)).map_batches(
        _read_idx, batch_size=1, fn_kwargs={"pair": pairs["test"]})
    return Source(splits, class_names, list(pairs["train"].images.dims[1:]))


# ----------------------------------------------------------------------------------------------- table
def _to_xy(batch: dict, cfg: DataConfig) -> dict:
    if cfg.label_column not in batch:
        raise DataError(f"table has no label column '{cfg.label_column}' (columns: {', '.join(batch)}); "
                        f"set data.label_column")
    if cfg.image_column:
        if cfg.image_column not in batch:
            raise DataError(f"table has no image column '{cfg.image_column}'; set data.image_column")
        x = np.stack([np.asarray(v, dtype=np.float32) for v in batch[cfg.image_column]])
    else:
        cols = cfg.feature_columns or [c for c in batch if c != cfg.label_column]
        missing = [c for c in cols if c not in batch]
        if missing:
            raise DataError(f"table is missing feature columns {missing}; fix data.feature_columns")
        x = np.stack([np.asarray(batch[c], dtype=np.float32) for c in cols], axis=1)
    return {"x": x, "label": np.asarray(batch[cfg.label_column])}


def ray_path(path: str | Path) -> str:
    """A file or folder on this machine's disk as Ray Data should name it. On a multi-node cluster its read
    and write tasks may run on another node, which lacks the folder; ``local://`` keeps them on this one.
    A URI (s3://...), which every node reads, is left as it is."""
    from modelworks.runtime import ray_is_local  # the driver only: Ray Data's tasks import this module too

    path = str(path)
    if "://" in path or ray_is_local():
        return path
    return "local://" + str(Path(path).resolve())


def _read_table(path: str, fmt: str) -> ray.data.Dataset:
    fmt = fmt if fmt != "auto" else ("csv" if ".csv" in path.lower() else "parquet")
    # As pandas reads a CSV: NA, null, NaN (and empty) cells are missing in text columns too, not the string "NA".
    convert = pacsv.ConvertOptions(strings_can_be_null=True)
    try:
        where = ray_path(path)
        return ray.data.read_csv(where, convert_options=convert) if fmt == "csv" else ray.data.read_parquet(where)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"cannot read table {path}: {err}; check data.path") from None


def table_source(cfg: DataConfig) -> Source:
    base = _read_table(cfg.path, cfg.format).map_batches(_to_xy, fn_kwargs={"cfg": cfg}, batch_format="numpy")
    if cfg.max_rows:
        base = base.limit(cfg.max_rows)
    carve = cfg.test_path is None
    splits = {s: base.map_batches(_keep, fn_kwargs={"split": s, "cfg": cfg, "carve_test": carve})
              for s in ("train", "val")}
    if carve:
        splits["test"] = base.map_batches(_keep, fn_kwargs={"split": "test", "cfg": cfg, "carve_test": True})
    else:
        splits["test"] = _read_table(cfg.test_path, cfg.format).map_batches(_to_xy, fn_kwargs={"cfg": cfg},
                                                                            batch_format="numpy")
    return Source(splits, {}, None)


# ------------------------------------------------------------------------------ tables, column by column
def _row_keys(frame) -> list[str]:
    """Each row's values as one string: what the keyed hash splits tables by (same row, same split)."""
    return ["\x1f".join(map(repr, row)) for row in frame.itertuples(index=False, name=None)]


def _keep_rows(batch, split: str, cfg: DataConfig, carve_test: bool):
    codes = text_split_codes(_row_keys(batch), cfg, True, carve_test)
    return batch[codes == SPLITS.index(split)]


def _select(batch, features: list[str], label: str):
    """The feature columns, and the label renamed `label` (the fixed name every step reads)."""
    out = batch[features].copy()
    out["label"] = batch[label]
    return out


def _schema(ds: ray.data.Dataset) -> dict:
    schema = ds.schema()
    if schema is None:
        raise DataError("the table has no rows; check data.path")
    return dict(zip(schema.names, schema.types))


def _sklearn_frame(cfg: DataConfig):
    """A table shipped inside scikit-learn (no download), with its target column named data.label_column."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, SKLEARN_TABLES[cfg.name])(as_frame=True)
    frame = bunch.frame.rename(columns={"target": cfg.label_column})
    names = getattr(bunch, "target_names", None)
    is_classes = names is not None and len(names) and bunch.target.dtype.kind in "iu"
    return frame, ({str(i): str(n) for i, n in enumerate(names)} if is_classes else {})


def tabular_source(cfg: DataConfig) -> Source:
    """A table read column by column (CSV/Parquet at data.path, or a scikit-learn table): the feature columns
    keep their names and types, their roles are inferred (or taken from the config), and the label column
    is checked here, on the driver, so a wrong name stops at once with one line."""
    if cfg.source == "sklearn":
        frame, names = _sklearn_frame(cfg)
        raw, where = ray.data.from_pandas(frame), f"scikit-learn's {cfg.name} table"
    else:
        raw, names, where = _read_table(cfg.path, cfg.format), {}, cfg.path
    from modelworks.data.table import infer_roles

    roles = infer_roles(_schema(raw), cfg, where)
    select = {"features": list(roles), "label": cfg.label_column}
    base = raw.map_batches(_select, batch_format="pandas", fn_kwargs=select)
    if cfg.max_rows:
        base = base.limit(cfg.max_rows)
    carve = cfg.test_path is None
    splits = {s: base.map_batches(_keep_rows, batch_format="pandas",
                                  fn_kwargs={"split": s, "cfg": cfg, "carve_test": carve})
              for s in (SPLITS if carve else ("train", "val"))}
    if not carve:
        test = _read_table(cfg.test_path, cfg.format)
        infer_roles(_schema(test), cfg, cfg.test_path)  # the same columns must be there
        splits["test"] = test.map_batches(_select, batch_format="pandas", fn_kwargs=select)
    return Source(splits, names, None, roles)


def load_source(cfg: DataConfig, data_dir_override: str | None = None) -> Source:
    if cfg.source == "digits":
        return digits_source(cfg)
    if cfg.source == "idx":
        return idx_source(cfg, data_dir(data_dir_override))
    if cfg.source == "text":
        from modelworks.data.text_files import text_source  # it builds on this module's Source and splits

        return text_source(cfg, data_dir(data_dir_override))
    if is_tabular(cfg):
        return tabular_source(cfg)
    return table_source(cfg)  # a table of images (data.image_column): one array per row, as digits/MNIST
