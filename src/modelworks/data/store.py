"""Arrays held on the driver, materialised as Parquet (the ingest and preprocess steps' outputs, see
pipeline/data_steps.py) and read back exactly: one column per array, rows of more than one value stored
flat as fixed-size lists, each array's row shape and dtype in the file's schema metadata. No Ray needed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_META = b"modelworks.shapes"


def write_arrays(path: Path, columns: dict[str, np.ndarray]) -> None:
    shapes = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in columns.items()}
    arrays = {}
    for k, v in columns.items():
        flat = np.ascontiguousarray(v).reshape(len(v), -1)
        arrays[k] = (pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
                     if v.ndim > 1 else pa.array(v))
    table = pa.table(arrays).replace_schema_metadata({_META: json.dumps(shapes).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Neither compressed nor dictionary-encoded: MNIST's pixels write and read back ~3x faster so (the files are
    # a run's own working copy, read back only by a rerun that reuses the step).
    pq.write_table(table, path, compression="none", use_dictionary=False)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    shapes = json.loads(table.schema.metadata[_META])
    out = {}
    for k, info in shapes.items():
        column = table.column(k).combine_chunks()
        if info["shape"]:
            values = column.flatten().to_numpy(zero_copy_only=False)
            out[k] = values.astype(info["dtype"], copy=False).reshape(len(column), *info["shape"])
        else:
            out[k] = column.to_numpy(zero_copy_only=False).astype(info["dtype"], copy=False)
    return out


def parquet_rows(path: Path) -> int:
    """Rows in a Parquet file or a folder of them (as Ray Data writes a split), read from the footers."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    return sum(pq.read_metadata(f).num_rows for f in files)
