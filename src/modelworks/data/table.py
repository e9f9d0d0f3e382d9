"""Tables: per-column preprocessing, fitted on the training split only, applied in Ray Data's ``map_batches``
(training) and in the Serve replica (serving) by the same numpy code.

Every feature column has a role (``infer_roles``: from its type, overridable by ``data.numeric_columns`` /
``data.categorical_columns``):
- numeric: a missing value becomes the training mean, then the column is standardised, (x - mean) / std,
  or min-max scaled, (x - min) / (max - min) (``data.scaling``);
- categorical: a missing value becomes the most frequent training value, then one-hot over the training
  values (at most ``data.max_categories``) plus one "unknown" slot, where values training never saw go.
A regression label is standardised as well; ``to_label_units`` maps the model's output back.

Why these statistics are not fitted by ``ray.data.preprocessors``: the formulas are theirs (StandardScaler
with ddof=0 and a std under 1e-8 taken as 1, MinMaxScaler likewise, SimpleImputer mean/most_frequent,
OneHotEncoder), and tests/test_table.py checks that this transform equals Ray's StandardScaler and
OneHotEncoder fitted on the same split. But each Ray preprocessor fits in its own pass, and the aggregating
ones through a hash shuffle: on 2 cores with 178 rows, 6-9 s for each of StandardScaler and SimpleImputer,
where one ``map_batches`` pass that gathers every column's statistics, the missing counts and the label map
takes 0.3 s. Their fitted state is a Python object, too; here it is plain JSON inside the checkpoint, which
the replica applies without Ray.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from modelworks.config import DataConfig
from modelworks.data.preprocess import JsonFields
from modelworks.errors import DataError

EPSILON = 1e-8                 # as Ray's scalers: a smaller spread counts as 1 (constant column)
NUMERIC, CATEGORICAL = "numeric", "categorical"
LOOKS_NUMERIC = 0.8            # an inferred text column whose values are mostly numbers is a dirty numeric column


# ------------------------------------------------------------------------------------------------ roles
def _kind(t: Any) -> str:
    """A column type as 'number', 'text' or something else, from Arrow or numpy/pandas types."""
    if isinstance(t, pa.DataType):
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            return "number"
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t) \
                or pa.types.is_dictionary(t) or pa.types.is_null(t):
            return "text"
        return str(t)
    kind = getattr(np.dtype(t) if not hasattr(t, "kind") else t, "kind", "O")
    return "number" if kind in "iuf" else "text" if kind in "bOSU" else str(t)


def infer_roles(schema: dict[str, Any], cfg: DataConfig, where: str) -> dict[str, str]:
    """Feature column -> numeric/categorical, in table order. ``schema``: column -> type (label included)."""
    columns = list(schema)
    if cfg.label_column not in schema:
        raise DataError(f"{where} has no label column '{cfg.label_column}' (columns: {', '.join(columns)}); "
                        f"set data.label_column to the column holding the label")
    for key in ("feature_columns", "numeric_columns", "categorical_columns"):
        unknown = [c for c in getattr(cfg, key) or [] if c not in schema]
        if unknown:
            raise DataError(f"data.{key}: {where} has no column '{unknown[0]}' (columns: {', '.join(columns)}); "
                            f"fix data.{key}")
    both = set(cfg.numeric_columns or []) & set(cfg.categorical_columns or [])
    if both:
        raise DataError(f"column '{sorted(both)[0]}' is in both data.numeric_columns and data.categorical_columns; "
                        f"keep it in one")
    features = cfg.feature_columns or [c for c in columns if c != cfg.label_column]
    if cfg.label_column in features:
        raise DataError(f"data.feature_columns includes the label column '{cfg.label_column}'; remove it")
    if not features:
        raise DataError(f"{where} has no feature columns besides the label '{cfg.label_column}'")
    if cfg.label_column != "label" and "label" in features:
        raise DataError(f"{where} has a feature column named 'label' while data.label_column is "
                        f"'{cfg.label_column}'; rename the column or leave it out with data.feature_columns")
    roles = {}
    for c in features:
        kind = _kind(schema[c])
        if c in (cfg.numeric_columns or []):
            roles[c] = NUMERIC  # text in it is reported by `fit` with the values and the fix
        elif c in (cfg.categorical_columns or []) or kind == "text":
            roles[c] = CATEGORICAL
        elif kind == "number":
            roles[c] = NUMERIC
        else:
            raise DataError(f"column '{c}' of {where} has type {kind}, neither numbers nor text; leave it out with "
                            f"data.feature_columns or convert it")
    return roles


# --------------------------------------------------------------------------------------- value helpers
def category_key(v: Any) -> str | None:
    """A categorical value as the string it is looked up by (None: missing). 3, 3.0 and "3" are one value,
    so a category typed as a number in the CSV and sent as JSON at serving time still matches."""
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer()):
        return str(int(v))
    text = str(v)
    return text if text.strip() else None


def numbers(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, NaN where missing; mask of values that are present but not finite numbers)."""
    if series.dtype.kind in "iufb":
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, np.isinf(values)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    blank = np.array([category_key(v) is None for v in series], dtype=bool)
    return np.where(blank, np.nan, values), ~blank & ~np.isfinite(values)


def _moments(v: np.ndarray) -> list[float]:
    """[n, mean, M2, min, max] of the finite values (M2: sum of squared deviations, merged with Chan's rule)."""
    v = v[np.isfinite(v)]
    if not len(v):
        return [0, 0.0, 0.0, math.inf, -math.inf]
    mean = float(v.mean())
    return [len(v), mean, float(((v - mean) ** 2).sum()), float(v.min()), float(v.max())]


def _merge_moments(a: list[float], b: list[float]) -> list[float]:
    n = a[0] + b[0]
    if not n:
        return a
    delta = b[1] - a[1]
    mean = a[1] + delta * b[0] / n
    return [n, mean, a[2] + b[2] + delta * delta * a[0] * b[0] / n, min(a[3], b[3]), max(a[4], b[4])]


# ------------------------------------------------------------------------------------------------ fitting
def _partial_stats(batch: pd.DataFrame, roles: dict[str, str], task: str) -> pd.DataFrame:
    """One block's statistics, as one JSON row: moments and text samples of numeric columns, value counts of
    categorical ones, missing counts, and the label's value counts (classification) or moments (regression)."""
    out: dict[str, Any] = {"rows": len(batch), "columns": {}}
    for name, role in {**roles, "label": NUMERIC if task == "regression" else CATEGORICAL}.items():
        col = batch[name]
        if role == NUMERIC:
            values, bad = numbers(col)
            out["columns"][name] = {"moments": _moments(values), "missing": int((np.isnan(values) & ~bad).sum()),
                                    "bad": int(bad.sum()), "bad_samples": [str(v) for v in col[bad].iloc[:3]]}
        else:
            keys = [category_key(v) for v in col]
            out["columns"][name] = {"counts": Counter(k for k in keys if k is not None),
                                    "missing": sum(k is None for k in keys)}
    return pd.DataFrame({"stats": [json.dumps(out)]})


def _merge(parts: list[dict]) -> dict:
    total: dict[str, Any] = {"rows": 0, "columns": {}}
    for part in parts:
        total["rows"] += part["rows"]
        for name, s in part["columns"].items():
            t = total["columns"].setdefault(name, {"missing": 0, **({"counts": Counter()} if "counts" in s else
                                                                   {"moments": [0, 0.0, 0.0, math.inf, -math.inf],
                                                                    "bad": 0, "bad_samples": []})})
            t["missing"] += s["missing"]
            if "counts" in s:
                t["counts"].update(s["counts"])
            else:
                t["moments"] = _merge_moments(t["moments"], s["moments"])
                t["bad"] += s["bad"]
                t["bad_samples"] = (t["bad_samples"] + s["bad_samples"])[:3]
    return total


def _is_number(key: str) -> bool:
    try:
        return math.isfinite(float(key))
    except ValueError:
        return False


def _looks_numeric(counts: Counter) -> bool:
    seen = sum(counts.values())
    return seen > 0 and sum(n for k, n in counts.items() if _is_number(k)) >= LOOKS_NUMERIC * seen


def _column(name: str, role: str, s: dict, cfg: DataConfig) -> dict:
    """One column's fitted state (plain JSON), or a DataError naming the column and the fix."""
    if role == NUMERIC:
        if s["bad"]:
            raise DataError(f"column '{name}' holds text where numbers are expected ({s['bad']} rows, e.g. "
                            f"{', '.join(map(repr, s['bad_samples']))}); fix those values (leave a cell empty "
                            f"for a missing value) or list the column in data.categorical_columns")
        n, mean, m2, lo, hi = s["moments"]
        if not n:
            raise DataError(f"column '{name}' has no values in the training split; leave it out with "
                            f"data.feature_columns")
        std = math.sqrt(m2 / n)
        center, scale = (mean, std) if cfg.scaling == "standard" else (lo, hi - lo)
        return {"name": name, "role": role, "fill": mean, "center": center, "scale": scale if scale >= EPSILON else 1.0,
                "mean": mean, "std": std, "min": lo, "max": hi, "missing": s["missing"]}
    counts: Counter = s["counts"]
    if not counts:
        raise DataError(f"column '{name}' has no values in the training split; leave it out with "
                        f"data.feature_columns")
    if name not in (cfg.categorical_columns or []) and _looks_numeric(counts):
        # Read as text, yet its values are numbers: some cell holds text (maybe outside the training split,
        # e.g. '?' for unknown). One-hot encoding every number would be silently wrong.
        text = [k for k in counts if not _is_number(k)][:3]
        raise DataError(f"column '{name}' is read as text, but its training values are numbers"
                        + (f" except {', '.join(map(repr, text))}" if text else "")
                        + "; fix the text cells (leave a cell empty for a missing value) and, to be sure, list "
                        "the column in data.numeric_columns (or in data.categorical_columns if it is a category)")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = sorted(k for k, _ in ranked[:cfg.max_categories])
    return {"name": name, "role": role, "fill": ranked[0][0], "categories": kept, "missing": s["missing"],
            "other_values": len(counts) - len(kept)}


def fit(train, roles: dict[str, str], task: str, class_names: dict[str, str], cfg: DataConfig) -> "TablePreprocessor":
    """One streaming pass over the training split (never validation or test); per-block statistics come back
    to the driver as JSON and are merged there."""
    parts = train.map_batches(_partial_stats, batch_format="pandas", batch_size=4096,
                              fn_kwargs={"roles": roles, "task": task}).take_all()
    return _finish([json.loads(p["stats"]) for p in parts], roles, task, class_names, cfg)


def fit_frame(frame: pd.DataFrame, roles: dict[str, str], task: str, class_names: dict[str, str],
              cfg: DataConfig) -> "TablePreprocessor":
    """The same fit on a pandas frame of training rows (features and `label`), without Ray."""
    part = _partial_stats(frame, roles, task)
    return _finish([json.loads(part["stats"][0])], roles, task, class_names, cfg)


def _finish(parts: list[dict], roles: dict[str, str], task: str, class_names: dict[str, str],
            cfg: DataConfig) -> "TablePreprocessor":
    stats = _merge(parts)
    if not stats["rows"]:
        raise DataError("the training split is empty; check the data path, data.max_rows and data.val_fraction")
    label = stats["columns"].pop("label")
    if label["missing"] or label.get("bad"):
        raise DataError(f"{label['missing'] + label.get('bad', 0)} training rows have no usable label in column "
                        f"'{cfg.label_column}'" + (f" (e.g. {', '.join(map(repr, label['bad_samples']))})"
                                                   if label.get("bad") else "") + "; drop or fix those rows")
    columns = [_column(name, role, stats["columns"][name], cfg) for name, role in roles.items()]
    if task == "regression":
        n, mean, m2, _, _ = label["moments"]
        std = math.sqrt(m2 / n)
        return TablePreprocessor(columns, task, [], [], cfg.label_column, stats["rows"], mean,
                                 std if std >= EPSILON else 1.0)
    from modelworks.data.text import label_map  # the one label ordering (numbers numerically, then text)

    classes, names = label_map(label["counts"], class_names)
    return TablePreprocessor(columns, task, classes, names, cfg.label_column, stats["rows"])


# ------------------------------------------------------------------------------------------ preprocessor
@dataclass
class TablePreprocessor(JsonFields):  # saved whole as preprocessor.json
    columns: list[dict]             # per feature column, in table order: role and fitted state (see _column)
    task: str                       # classification | regression
    classes: list                   # label values (as strings) in index order; empty for regression
    class_names: list[str] = field(default_factory=list)
    label_column: str = "label"
    rows: int = 0                   # training rows it was fitted on
    target_center: float = 0.0      # regression: the label is (y - center) / scale for the model
    target_scale: float = 1.0
    kind: str = "table"
    raw_column = None               # reads named columns, not one array column

    @property
    def feature_names(self) -> list[str]:
        return [c["name"] for c in self.columns]

    @property
    def input_dim(self) -> int:
        return sum(1 if c["role"] == NUMERIC else len(c["categories"]) + 1 for c in self.columns)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    @cached_property
    def _lookups(self) -> dict[str, dict[str, int]]:
        return {c["name"]: {k: i for i, k in enumerate(c["categories"])} for c in self.columns
                if c["role"] == CATEGORICAL}

    # -- applying --------------------------------------------------------------------------------
    def frame(self, raw: Any) -> pd.DataFrame:
        """Raw rows as a DataFrame: a DataFrame, a dict of columns (a Ray batch), a list of {column: value}
        rows, or rows of values in ``feature_names`` order."""
        if isinstance(raw, pd.DataFrame):
            return raw
        if isinstance(raw, dict):
            return pd.DataFrame({k: list(v) if isinstance(v, np.ndarray) and v.ndim > 1 else v
                                 for k, v in raw.items()})
        rows = list(raw)
        if rows and isinstance(rows[0], dict):
            return pd.DataFrame(rows, columns=self.feature_names)
        return pd.DataFrame([list(r) for r in rows], columns=self.feature_names)

    def missing_counts(self, frame: pd.DataFrame) -> dict[str, int]:
        """Missing values per feature column: what ``transform_features`` fills in."""
        out = {}
        for c in self.columns:
            col = frame[c["name"]]
            out[c["name"]] = int(np.isnan(numbers(col)[0]).sum()) if c["role"] == NUMERIC else \
                sum(category_key(v) is None for v in col)
        return out

    def transform_features(self, frame: pd.DataFrame) -> np.ndarray:
        """Raw columns -> float32 (B, input_dim): imputed, scaled numbers and one-hot categories."""
        n = len(frame)
        out = np.zeros((n, self.input_dim), dtype=np.float32)
        at = 0
        for c in self.columns:
            name = c["name"]
            if name not in frame:
                raise DataError(f"column '{name}' is missing (the model was trained on "
                                f"{', '.join(self.feature_names)})")
            if c["role"] == NUMERIC:
                values, bad = numbers(frame[name])
                if bad.any():
                    raise DataError(f"column '{name}' holds text where numbers are expected (e.g. "
                                    f"{frame[name][bad].iloc[0]!r}); fix the value or leave it empty")
                values = np.where(np.isnan(values), c["fill"], values)
                out[:, at] = (values - c["center"]) / c["scale"]
                at += 1
            else:
                lookup, unknown = self._lookups[name], len(c["categories"])
                keys = (category_key(v) for v in frame[name])
                idx = [lookup.get(c["fill"] if k is None else k, unknown) for k in keys]
                out[np.arange(n), at + np.asarray(idx, dtype=np.int64)] = 1.0
                at += unknown + 1
        return out

    def encode_labels(self, labels) -> np.ndarray:
        """Class indices (int64), or for regression the label in its own units (float64)."""
        if self.task == "regression":
            values, bad = numbers(pd.Series(labels))
            if bad.any() or np.isnan(values).any():
                raise DataError(f"label column '{self.label_column}' has a missing or non-numeric value; drop or "
                                f"fix those rows")
            return values
        lookup = {str(k): i for i, k in enumerate(self.classes)}
        keys = [category_key(v) for v in labels]
        unknown = [k for k in keys if k not in lookup]
        if unknown:
            raise DataError(f"label {unknown[0]!r} in column '{self.label_column}' was not seen in the training "
                            f"split (known: {self.classes[:20]}); fix the row or the label column")
        return np.array([lookup[k] for k in keys], dtype=np.int64)

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        """The map_batches function: {features..., label} -> {x: float32 (B, D), y: int64 | float32 (B,)}."""
        y = self.encode_labels(batch["label"])
        if self.task == "regression":
            y = ((y - self.target_center) / self.target_scale).astype(np.float32)
        return {"x": self.transform_features(batch), "y": y}

    def apply(self, ds):
        return ds.map_batches(self, batch_format="pandas", batch_size=4096)

    def to_model_input(self, raw) -> torch.Tensor:
        return torch.from_numpy(self.transform_features(self.frame(raw)))

    def to_label_units(self, outputs: torch.Tensor) -> torch.Tensor:
        """Regression: the model's (B, 1) output -> (B,) predictions in the label's units."""
        return outputs[:, 0] * self.target_scale + self.target_center

    @classmethod
    def from_dict(cls, data: dict) -> "TablePreprocessor":
        return cls(**data)
