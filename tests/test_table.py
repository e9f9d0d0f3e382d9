"""Tables: column roles, per-column preprocessing fitted on the training split only, missing values, bad
tables that stop with one line, and the fitted state's round trip through a checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from modelworks import checkpoint
from modelworks.config import DataConfig
from modelworks.data import sources, table
from modelworks.errors import DataError
from modelworks.models import build_model
from modelworks.steps import passes_gate

REPO = Path(__file__).resolve().parents[1]


def shop_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Numbers on very different scales, a categorical column and a 3-class label that depends on both."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"price": rng.normal(500, 200, n).round(2), "weight": rng.normal(0.5, 0.1, n).round(4),
                          "items": rng.integers(1, 20, n), "region": rng.choice(["north", "south", "east"], n)})
    score = (frame.price - 500) / 200 + (frame.region == "north") * 1.5 - (frame.weight - 0.5) * 10
    frame["kind"] = np.select([score < -0.5, score < 0.8], ["low", "mid"], "high")
    return frame


def pre_cfg(**kw) -> DataConfig:
    return DataConfig(source="table", path="shop.csv", label_column="kind", **kw)


def fitted(frame: pd.DataFrame, cfg: DataConfig, task: str = "classification") -> table.TablePreprocessor:
    roles = table.infer_roles({c: frame[c].dtype for c in frame}, cfg, "shop.csv")
    return table.fit_frame(frame.rename(columns={cfg.label_column: "label"}), roles, task, {}, cfg)


# --------------------------------------------------------------------------------------- pure (no Ray)
def test_roles_are_inferred_from_types_and_overridable():
    schema = {"price": pa.float64(), "items": pa.int64(), "region": pa.string(), "member": pa.bool_(),
              "zip": pa.int64(), "kind": pa.string()}
    assert table.infer_roles(schema, pre_cfg(), "t.csv") == {
        "price": "numeric", "items": "numeric", "region": "categorical", "member": "categorical", "zip": "numeric"}
    roles = table.infer_roles(schema, pre_cfg(categorical_columns=["zip"], feature_columns=["price", "zip"]), "t.csv")
    assert roles == {"price": "numeric", "zip": "categorical"}
    with pytest.raises(DataError, match="data.numeric_columns: t.csv has no column 'nope'"):
        table.infer_roles(schema, pre_cfg(numeric_columns=["nope"]), "t.csv")


def test_transform_imputes_scales_one_hots_and_maps_unseen_values_to_unknown():
    frame = pd.DataFrame({"a": [1.0, 3.0, np.nan, 5.0], "c": ["x", "y", None, "x"], "kind": ["p", "q", "p", "q"]})
    pre = fitted(frame, pre_cfg())
    a, c = pre.columns
    assert (a["mean"], a["missing"], c["categories"], c["fill"], c["missing"]) == (3.0, 1, ["x", "y"], "x", 1)
    x = pre.transform_features(pre.frame([{"a": None, "c": "never seen", "kind": "p"}, {"a": 5.0, "c": "y"}]))
    std = np.std([1.0, 3.0, 5.0])
    # [a, c=x, c=y, c=unknown]: a missing number is the training mean (0 once scaled), an unseen category is
    # the unknown slot, and values keep their column's own scale.
    np.testing.assert_allclose(x, [[0, 0, 0, 1], [2 / std, 0, 1, 0]], rtol=1e-6)
    assert pre.input_dim == 4 and pre.classes == ["p", "q"]
    minmax = fitted(frame, pre_cfg(scaling="minmax"))
    np.testing.assert_allclose(minmax.transform_features(frame)[:, 0], [0, 0.5, 0.5, 1])
    # A category typed as a number in the file and sent as JSON at serving time is the same value.
    assert table.category_key(3) == table.category_key(3.0) == table.category_key("3") == "3"


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_fitted_preprocessing_round_trips_through_a_checkpoint(tmp_path, task):
    frame = shop_frame(80)
    frame.loc[::7, "price"] = np.nan
    frame.loc[::5, "region"] = None
    if task == "regression":
        frame["kind"] = frame.price.fillna(400) * 2 + 7
    pre = fitted(frame, pre_cfg(), task)
    spec = {"name": "mlp", "input_dim": pre.input_dim, "num_classes": pre.num_classes, "hidden_sizes": [8],
            "task": task}
    torch.manual_seed(0)
    model = build_model(spec).eval()
    checkpoint.save(tmp_path / "ckpt", model=model, spec=spec, preprocessor=pre, metrics={"epoch": 1},
                    config={"name": "shop"})
    loaded = checkpoint.load(tmp_path / "ckpt")  # checksums verified
    assert loaded.preprocessor == pre and loaded.task == task
    probe = pd.concat([frame.head(20), pd.DataFrame([{"price": None, "weight": 0.5, "items": 3,
                                                      "region": "never seen"}])], ignore_index=True)
    assert np.array_equal(loaded.preprocessor.transform_features(probe), pre.transform_features(probe))
    with torch.no_grad():
        expected = model(torch.from_numpy(pre.transform_features(probe)))
    got = loaded.predict_outputs(probe.to_dict("records"))
    if task == "regression":
        torch.testing.assert_close(got[:, 0], expected[:, 0] * pre.target_scale + pre.target_center)
    else:
        torch.testing.assert_close(got, torch.softmax(expected, 1))


@pytest.mark.parametrize("value, threshold, production, better, margin, ok", [
    (0.45, 0.40, None, "higher", 0.0, True),
    (0.35, 0.40, None, "higher", 0.0, False),   # under the threshold
    (0.45, 0.40, 0.50, "higher", 0.0, False),   # worse than production
    (30.0, 40.0, 31.0, "lower", 0.5, True),     # an error: lower is better, margin applies downwards
    (30.8, 40.0, 31.0, "lower", 0.5, False),
    (float("nan"), None, None, "higher", 0.0, False),
])
def test_gate_reads_the_metric_in_its_direction(value, threshold, production, better, margin, ok):
    assert passes_gate(value, threshold, production, better, margin) is ok


# ---------------------------------------------------------------------------------- real local Ray
@pytest.mark.ray
@pytest.mark.slow  # Ray's own StandardScaler fit (a hash-shuffle aggregate) alone takes ~7 s here
def test_statistics_are_fitted_on_the_training_split_only(ray_local, tmp_path):
    frame = shop_frame(300)
    frame.to_csv(tmp_path / "shop.csv", index=False)
    # Values planted only in the test file: a huge price and a region training never saw.
    test = shop_frame(40, seed=1).assign(price=1e6, region="atlantis")
    test.to_csv(tmp_path / "test.csv", index=False)
    cfg = DataConfig(source="table", path=str(tmp_path / "shop.csv"), test_path=str(tmp_path / "test.csv"),
                     label_column="kind", val_fraction=0.2)
    src = sources.tabular_source(cfg)
    assert src.roles == {"price": "numeric", "weight": "numeric", "items": "numeric", "region": "categorical"}
    pre = table.fit(src.splits["train"], src.roles, "classification", {}, cfg)
    train, val = src.splits["train"].to_pandas(), src.splits["val"].to_pandas()
    price = pre.columns[0]
    assert pre.rows == len(train) and len(train) + len(val) == 300 and len(val) > 30
    assert price["mean"] == pytest.approx(train.price.mean(), rel=1e-12)
    assert price["std"] == pytest.approx(train.price.std(ddof=0), rel=1e-9)
    assert price["mean"] != pytest.approx(frame.price.mean(), rel=1e-6)  # validation rows are left out too
    assert price["max"] < 2000 and "atlantis" not in pre.columns[3]["categories"]
    # The test split goes through the training statistics: the unseen region lands in the unknown slot.
    x = pre(src.splits["test"].take_batch(40, batch_format="pandas"))["x"]
    assert np.all(x[:, 3 + 3] == 1) and np.all(x[:, 0] > 1000)
    # The same numbers as Ray Data's own preprocessors fitted on the same split.
    from ray.data.preprocessors import OneHotEncoder, StandardScaler

    theirs = OneHotEncoder(["region"]).fit(src.splits["train"]).transform_batch(
        StandardScaler(["price", "weight", "items"]).fit(src.splits["train"]).transform_batch(train.copy()))
    ours = pre.transform_features(train)
    np.testing.assert_allclose(ours[:, :3], theirs[["price", "weight", "items"]].to_numpy(dtype=np.float64), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(ours[:, 3:6], np.stack(theirs["region"].to_numpy()).astype(np.float32))


@pytest.mark.ray
def test_missing_values_are_imputed_and_counted(ray_local, tmp_path):
    frame = shop_frame(200)
    frame.loc[::9, "price"] = np.nan
    frame.loc[::6, "region"] = None
    frame.to_csv(tmp_path / "shop.csv", index=False)
    with open(tmp_path / "shop.csv", "a") as f:
        f.write("NA,0.5,3,NA,mid\n")  # as pandas reads it: NA is missing in a text column too
    cfg = DataConfig(source="table", path=str(tmp_path / "shop.csv"), label_column="kind")
    src = sources.tabular_source(cfg)
    pre = table.fit(src.splits["train"], src.roles, "classification", {}, cfg)
    train = src.splits["train"].to_pandas()
    missing = {c["name"]: c["missing"] for c in pre.columns}
    assert missing == {"price": train.price.isna().sum(), "weight": 0, "items": 0, "region": train.region.isna().sum()}
    assert missing["price"] > 5 and missing["region"] > 10
    x = pre(train)["x"]
    assert np.isfinite(x).all() and x.shape == (len(train), pre.input_dim)


@pytest.mark.ray
@pytest.mark.parametrize("case, needle", [
    ("no_label", "has no label column 'quality'"),
    ("text_among_numbers", "column 'weight' is read as text"),
    ("text_in_numeric_role", "column 'region' holds text where numbers are expected"),
])
def test_bad_tables_stop_with_one_line_naming_the_column(ray_local, tmp_path, case, needle):
    frame = shop_frame(60)
    if case == "text_among_numbers":
        frame["weight"] = frame.weight.astype(str)
        frame.loc[::10, "weight"] = "heavy"
    frame.to_csv(tmp_path / "shop.csv", index=False)
    cfg = DataConfig(source="table", path=str(tmp_path / "shop.csv"),
                     label_column="quality" if case == "no_label" else "kind",
                     numeric_columns=["region"] if case == "text_in_numeric_role" else None)
    with pytest.raises(DataError) as err:
        src = sources.tabular_source(cfg)
        table.fit(src.splits["train"], src.roles, "classification", {}, cfg)
    message = str(err.value)
    assert needle in message and "\n" not in message
    fix = {"no_label": "set data.label_column", "text_among_numbers": "data.numeric_columns",
           "text_in_numeric_role": "data.categorical_columns"}[case]
    assert fix in message


@pytest.mark.slow  # starts its own Ray in the CLI process
def test_cli_table_without_its_label_column_is_one_line(tmp_path, modelworks_home):
    shop_frame(30).to_csv(tmp_path / "shop.csv", index=False)
    proc = subprocess.run([sys.executable, "-m", "modelworks.cli", "run", str(REPO / "workflows/wine.py"),
                           "--set", "data.source=table", "--set", f"data.path={tmp_path / 'shop.csv'}",
                           "--set", "data.label_column=quality"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MODELWORKS_PROGRESS": "0"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no label column 'quality'" in last and "data.label_column" in last
    # The run said up front which name it would register under: the data's, not the workflow's.
    assert "registers as 'shop'" in proc.stdout
