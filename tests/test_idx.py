"""IDX files: real parsing of generated files, every corruption class gives a clear DataError."""
import gzip
import struct

import numpy as np
import pytest

from modelworks.data import idx
from modelworks.errors import DataError


def write_idx(path, array: np.ndarray, compress: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return data


def make_split(folder, n_images=50, n_labels=50, compress=True, split="train"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n_labels,), dtype=np.uint8)
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    stem_i, stem_l = idx.FILES[split]
    ext = ".gz" if compress else ""
    write_idx(folder / "raw" / f"{stem_i}{ext}", images, compress)
    write_idx(folder / "raw" / f"{stem_l}{ext}", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_rows(tmp_path, compress):
    images, labels = make_split(tmp_path, compress=compress)
    pair = idx.open_split(tmp_path, "mnist", "train", allow_download=False)
    assert pair.rows == 50 and pair.images.dims == (50, 28, 28)
    np.testing.assert_array_equal(idx.read_rows(pair.images, 10, 20), images[10:20])
    np.testing.assert_array_equal(idx.read_rows(pair.labels, 0, 50), labels)


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_file_is_refused(tmp_path, compress):
    make_split(tmp_path, compress=compress)
    path = tmp_path / "raw" / ("train-images-idx3-ubyte" + (".gz" if compress else ""))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError) as err:
        idx.open_split(tmp_path, "mnist", "train", allow_download=False)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and ("truncated" in msg or "holds" in msg)
    assert "delete" in msg  # the fix is named


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("change", ["truncated", "extra bytes"])
def test_reading_whole_checks_the_length_as_open_split_does(tmp_path, compress, change):
    """read_all (the in-memory path, one pass) refuses what check_size refuses, with the same kind of message."""
    images, _ = make_split(tmp_path, compress=compress)
    pair = idx.open_split(tmp_path, "mnist", "train", allow_download=False, check_sizes=False)
    np.testing.assert_array_equal(idx.read_all(pair.images), images)
    path = tmp_path / "raw" / ("train-images-idx3-ubyte" + (".gz" if compress else ""))
    raw = gzip.decompress(path.read_bytes()) if compress else path.read_bytes()
    raw = raw[:-100] if change == "truncated" else raw + b"\0" * 100
    path.write_bytes(gzip.compress(raw) if compress else raw)
    header = idx.open_split(tmp_path, "mnist", "train", allow_download=False, check_sizes=False).images
    with pytest.raises(DataError) as err:
        idx.read_all(header)
    expected = 50 * 28 * 28
    assert f"promises 50 rows ({expected} bytes) but the file holds {expected + (100 if change != 'truncated' else -100)}" \
        in str(err.value) and "delete" in str(err.value)


def test_count_mismatch_between_images_and_labels(tmp_path):
    make_split(tmp_path, n_images=50, n_labels=40)
    with pytest.raises(DataError, match="50 images but 40 labels"):
        idx.open_split(tmp_path, "mnist", "train", allow_download=False)


def test_bad_magic(tmp_path):
    make_split(tmp_path)
    (tmp_path / "raw" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"hello world, not idx"))
    with pytest.raises(DataError, match="not an IDX file"):
        idx.open_split(tmp_path, "mnist", "train", allow_download=False)


def test_garbage_gzip(tmp_path):
    make_split(tmp_path)
    path = tmp_path / "raw" / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[40:80] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        idx.open_split(tmp_path, "mnist", "train", allow_download=False)


def test_missing_files_without_download_names_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        idx.open_split(tmp_path, "mnist", "train", allow_download=False)
    assert "MODELWORKS_DATA_DIR" in str(err.value) and "train-images-idx3-ubyte" in str(err.value)


def test_real_mnist_files_pass_checks(mnist_dir):
    train = idx.open_split(mnist_dir, "mnist", "train", allow_download=False)
    test = idx.open_split(mnist_dir, "mnist", "test", allow_download=False)
    assert (train.rows, test.rows) == (60000, 10000)
    assert idx.read_rows(train.labels, 0, 8).tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
