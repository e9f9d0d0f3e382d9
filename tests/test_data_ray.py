"""Ray Data sources and the preprocessor on a real local Ray: splits, tables, IDX, fit-on-train-only."""
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from modelworks.config import DataConfig
from modelworks.data import preprocess, sources
from modelworks.errors import DataError
from tests.test_idx import make_split

pytestmark = pytest.mark.ray


def rows(ds):
    return sum(len(b["label"]) for b in ds.iter_batches(batch_size=4096, batch_format="numpy"))


def test_split_codes_are_seeded_and_proportional():
    x = np.random.default_rng(0).integers(0, 255, size=(20000, 16), dtype=np.uint8)
    a = sources.split_codes(x, 0, 0.1, 0.2)
    assert np.array_equal(a, sources.split_codes(x, 0, 0.1, 0.2))  # reproducible
    assert not np.array_equal(a, sources.split_codes(x, 1, 0.1, 0.2))  # the seed matters
    assert abs((a == 2).mean() - 0.2) < 0.015 and abs((a == 1).mean() - 0.08) < 0.015
    # blocking does not matter: codes depend only on each row
    assert np.array_equal(a[5000:6000], sources.split_codes(x[5000:6000], 0, 0.1, 0.2))


def test_digits_splits_are_disjoint_and_complete(ray_local):
    src = sources.digits_source(DataConfig(source="digits", val_fraction=0.15, test_fraction=0.2))
    seen = {s: {r["x"].tobytes() for r in src.splits[s].take_all()} for s in sources.SPLITS}
    assert sum(rows(src.splits[s]) for s in sources.SPLITS) == 1797
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["val"])
    assert 300 < rows(src.splits["test"]) < 420


def test_digits_are_read_as_scikit_learns_loader_reads_them():
    cfg = DataConfig(source="digits")
    src = sources.digits_source(cfg)
    x = np.concatenate([src.arrays[s]["x"] for s in sources.SPLITS])
    y = np.concatenate([src.arrays[s]["label"] for s in sources.SPLITS])
    ref = load_digits()
    order = np.concatenate([np.flatnonzero(sources.split_codes(
        ref.images.astype(np.float32), cfg.split_seed, cfg.val_fraction, cfg.test_fraction) == i) for i in range(3)])
    assert x.shape == (1797, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, ref.images[order].astype(np.float32)) and np.array_equal(y, ref.target[order])


def test_in_memory_splits_become_datasets_only_when_read(ray_local):
    src = sources.digits_source(DataConfig(source="digits"))
    assert isinstance(src.splits, sources.ArraySplits) and src.splits._made == {}  # nothing in the object store yet
    assert list(src.splits) == list(sources.SPLITS)
    val = src.splits["val"].take_all()  # made on first use, from the same rows as the arrays
    assert list(src.splits._made) == ["val"] and src.splits["val"] is src.splits["val"]
    assert np.array_equal(np.stack([r["x"] for r in val]), src.arrays["val"]["x"])
    assert [r["label"] for r in val] == src.arrays["val"]["label"].tolist()


def test_preprocessor_is_fitted_on_train_only(ray_local, tmp_path):
    # Train-ish rows around 0, and a few rows with huge values: wherever those land outside train,
    # the fitted mean must not see them.
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, size=(3000, 4)).astype(np.float32)
    x[:300] += 1000.0
    df = pd.DataFrame(x, columns=list("abcd")).assign(label=rng.integers(0, 3, 3000))
    df.to_csv(tmp_path / "t.csv", index=False)
    cfg = DataConfig(source="table", path=str(tmp_path / "t.csv"), val_fraction=0.2, test_fraction=0.2)
    src = sources.table_source(cfg)
    pre = preprocess.fit(src.splits["train"], {}, None)
    codes = sources.split_codes(df[list("abcd")].to_numpy(np.float32), 0, 0.2, 0.2)
    train_only = df[list("abcd")].to_numpy(np.float64)[codes == 0]
    assert pre.mean == pytest.approx(train_only.mean(), rel=1e-6)
    assert pre.mean != pytest.approx(df[list("abcd")].to_numpy().mean(), rel=1e-3)
    assert pre.classes == [0, 1, 2] and pre.input_shape == [4]
    batch = pre(src.splits["test"].take_batch(8, batch_format="numpy"))
    assert batch["x"].dtype == np.float32 and batch["x"].shape == (8, 4) and batch["y"].dtype == np.int64


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_sources_with_pixel_columns_or_image_column(ray_local, tmp_path, fmt):
    d = load_digits()
    if fmt == "csv":
        df = pd.DataFrame(d.data, columns=[f"p{i}" for i in range(64)]).assign(digit=d.target)
        path = tmp_path / "digits.csv"
        df.to_csv(path, index=False)
        cfg = DataConfig(source="table", path=str(path), label_column="digit")
    else:
        df = pd.DataFrame({"image": list(d.data.astype(np.float32)), "digit": d.target.astype(str)})
        path = tmp_path / "digits.parquet"
        df.to_parquet(path)
        cfg = DataConfig(source="table", path=f"file://{path}", label_column="digit", image_column="image")
    src = sources.table_source(cfg)
    assert sum(rows(src.splits[s]) for s in sources.SPLITS) == 1797
    pre = preprocess.fit(src.splits["train"], {}, None)
    assert pre.input_dim == 64 and pre.num_classes == 10
    assert pre.mean == pytest.approx(d.data.mean(), rel=0.05)


def test_table_with_a_wrong_label_column_fails_clearly(ray_local, tmp_path):
    pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}).to_csv(tmp_path / "t.csv", index=False)
    src = sources.table_source(DataConfig(source="table", path=str(tmp_path / "t.csv")))
    with pytest.raises(Exception) as err:
        src.splits["train"].take_all()
    assert "no label column 'label'" in str(err.value)


def test_missing_table_is_a_data_error(ray_local, tmp_path):
    with pytest.raises(DataError, match="check data.path"):
        sources.table_source(DataConfig(source="table", path=str(tmp_path / "nope.parquet")))


def test_idx_source_from_generated_files(ray_local, tmp_path):
    images, labels = make_split(tmp_path / "mnist", n_images=400, n_labels=400)
    make_split(tmp_path / "mnist", n_images=100, n_labels=100, split="test")
    cfg = DataConfig(source="idx", name="mnist", val_fraction=0.1, download=False)
    src = sources.idx_source(cfg, tmp_path)
    assert rows(src.splits["train"]) + rows(src.splits["val"]) == 400
    assert rows(src.splits["test"]) == 100
    got = sorted(r["x"].tobytes() for r in src.splits["train"].take_all() + src.splits["val"].take_all())
    assert got == sorted(img.tobytes() for img in images)


def test_in_memory_and_streaming_idx_give_the_same_splits_and_preprocessor(ray_local, tmp_path, monkeypatch):
    """Small image data is read on the driver (no Ray Data pass to split, fit or score it); it must be the very
    same rows per split, and the same fitted preprocessor, as the streaming path larger data takes."""
    make_split(tmp_path / "mnist", n_images=600, n_labels=600)
    make_split(tmp_path / "mnist", n_images=50, n_labels=50, split="test")
    cfg = DataConfig(source="idx", name="mnist", val_fraction=0.2, download=False)
    in_memory = sources.idx_source(cfg, tmp_path)
    monkeypatch.setattr(sources, "IN_MEMORY_MAX_BYTES", 0)
    streaming = sources.idx_source(cfg, tmp_path)
    assert in_memory.arrays is not None and streaming.arrays is None
    for split in sources.SPLITS:
        ours = sorted(zip((x.tobytes() for x in in_memory.arrays[split]["x"]), in_memory.arrays[split]["label"]))
        theirs = sorted((r["x"].tobytes(), r["label"]) for r in streaming.splits[split].take_all())
        same_ds = sorted((r["x"].tobytes(), r["label"]) for r in in_memory.splits[split].take_all())
        assert ours == theirs == same_ds and len(ours) > 0
    fitted = preprocess.fit_arrays(in_memory.arrays["train"]["x"], in_memory.arrays["train"]["label"], {})
    streamed = preprocess.fit(streaming.splits["train"], {}, None)
    assert fitted.mean == pytest.approx(streamed.mean, rel=1e-9) and fitted.std == pytest.approx(streamed.std, rel=1e-9)
    assert fitted.classes == streamed.classes and fitted.input_shape == streamed.input_shape == [28, 28]


def test_real_mnist_source_counts(ray_local, mnist_dir):
    cfg = DataConfig(source="idx", name="mnist", val_fraction=0.1, download=False)
    src = sources.idx_source(cfg, mnist_dir.parent)
    n_train, n_val = rows(src.splits["train"]), rows(src.splits["val"])
    assert n_train + n_val == 60000 and 5500 < n_val < 6500
    assert rows(src.splits["test"]) == 10000
    assert src.class_names["3"] == "3"


def test_text_rows_collect_in_the_same_order_whatever_the_row_order(ray_local):
    # A worker shuffles row positions each epoch, so the order Ray Data delivers rows in must not matter.
    import ray

    from modelworks.train_text import _collect

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(300, 6)).astype(np.int32)
    rows = {"ids": ids, "length": rng.integers(1, 7, 300).astype(np.int32), "y": np.arange(300) % 2}
    ids[11], rows["length"][11] = ids[20], rows["length"][20]  # a repeated text, with two labels
    items = [{k: v[i] for k, v in rows.items()} for i in range(300)]
    a = _collect(ray.data.from_items(items, override_num_blocks=6))
    b = _collect(ray.data.from_items(items[::-1], override_num_blocks=6))
    assert all(np.array_equal(a[k], b[k]) for k in rows) and len(a["y"]) == 300
    # every row kept with its own length and label
    assert sorted(map(tuple, np.column_stack([a["ids"], a["length"], a["y"]]))) == \
        sorted(map(tuple, np.column_stack([ids, rows["length"], rows["y"]])))
