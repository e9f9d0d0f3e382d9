"""MNIST-style IDX files (gzip or raw): header checks, streamed size check, row-range reads, download.

Format (yann.lecun.com/exdb/mnist): two zero bytes, a type byte (0x08 = unsigned byte), the number of
dimensions, then one big-endian uint32 per dimension, then the data in C order.
"""
from __future__ import annotations

import gzip
import shutil
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelworks.errors import DataError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class IdxHeader:
    path: str
    dims: tuple[int, ...]
    offset: int  # bytes before the data

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.dims[1:], dtype=np.int64)) if len(self.dims) > 1 else 1


def _open(path: str | Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _fix_hint(path) -> str:
    return f"delete {path} and fetch it again (or copy a good file there)"


def read_header(path: str | Path) -> IdxHeader:
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0":
                raise DataError(f"{path}: not an IDX file (bad magic number); {_fix_hint(path)}")
            if head[2] != 0x08:
                raise DataError(f"{path}: IDX type 0x{head[2]:02x} is not unsigned byte; only uint8 IDX is supported")
            ndim = head[3]
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header; {_fix_hint(path)}")
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: unreadable ({err}); {_fix_hint(path)}") from None
    return IdxHeader(str(path), struct.unpack(f">{ndim}I", raw), 4 + 4 * ndim)


def check_size(header: IdxHeader) -> None:
    """Stream through the file once (constant memory) and check it holds exactly what the header says."""
    seen = 0
    try:
        with _open(header.path) as f:
            f.seek(header.offset)
            while chunk := f.read(_CHUNK):
                seen += len(chunk)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{header.path}: corrupt or truncated ({err}); {_fix_hint(header.path)}") from None
    _check_bytes(header, seen)


def read_all(header: IdxHeader) -> np.ndarray:
    """Every row, checked as ``check_size`` checks: one pass over the file for data that is read whole
    (decompressing MNIST's training images takes about a second; checking first, then reading, took two)."""
    try:
        with _open(header.path) as f:
            f.seek(header.offset)
            buf = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{header.path}: corrupt or truncated ({err}); {_fix_hint(header.path)}") from None
    _check_bytes(header, len(buf))
    return np.frombuffer(buf, dtype=np.uint8).reshape(header.dims)


def _check_bytes(header: IdxHeader, seen: int) -> None:
    expected = header.dims[0] * header.row_bytes
    if seen != expected:
        raise DataError(f"{header.path}: header promises {header.dims[0]} rows ({expected} bytes) but the file "
                        f"holds {seen} bytes; {_fix_hint(header.path)}")


def read_rows(header: IdxHeader, start: int, stop: int) -> np.ndarray:
    with _open(header.path) as f:
        f.seek(header.offset + start * header.row_bytes)
        buf = f.read((stop - start) * header.row_bytes)
    return np.frombuffer(buf, dtype=np.uint8).reshape((stop - start, *header.dims[1:]))


def find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / "raw" / f"{stem}.gz", folder / "raw" / stem, folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def download(name: str, folder: Path, stems: list[str], timeout_s: float = 15.0) -> None:
    """Fetch missing files from the usual mirrors into folder/raw. Raises DataError when none answers."""
    mirrors = MIRRORS.get(name)
    if not mirrors:
        raise DataError(f"no download mirror known for '{name}'")
    target = folder / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        last_err: Exception | None = None
        for base in mirrors:
            tmp = target / f"{stem}.gz.part"
            try:
                with urllib.request.urlopen(base + stem + ".gz", timeout=timeout_s) as resp, open(tmp, "wb") as out:
                    shutil.copyfileobj(resp, out)
                tmp.rename(target / f"{stem}.gz")
                last_err = None
                break
            except OSError as err:
                last_err = err
                tmp.unlink(missing_ok=True)
        if last_err is not None:
            raise DataError(f"could not download {stem}.gz ({last_err})")


@dataclass(frozen=True)
class IdxPair:
    """Matching image and label files of one split, checked against each other."""
    images: IdxHeader
    labels: IdxHeader

    @property
    def rows(self) -> int:
        return self.images.dims[0]

    def check_sizes(self) -> None:
        """Each file holds exactly what its header says (``check_size``)."""
        check_size(self.images)
        check_size(self.labels)


def open_split(folder: Path, name: str, split: str, allow_download: bool, check_sizes: bool = True) -> IdxPair:
    """The split's image and label files, their headers checked against each other; with ``check_sizes``
    also each file's length (a caller that reads them whole with ``read_all`` checks it there instead)."""
    image_stem, label_stem = FILES[split]
    paths = [find_file(folder, image_stem), find_file(folder, label_stem)]
    if None in paths:
        missing = [s for s, p in zip((image_stem, label_stem), paths) if p is None]
        if allow_download:
            try:
                download(name, folder, missing)
            except DataError as err:
                raise DataError(f"{name}: {', '.join(missing)} not found under {folder} and the download failed "
                                f"({err}); copy the IDX files into {folder}/raw or set MODELWORKS_DATA_DIR") from None
            paths = [find_file(folder, image_stem), find_file(folder, label_stem)]
        else:
            raise DataError(f"{name}: {', '.join(missing)} not found under {folder}; copy the IDX files into "
                            f"{folder}/raw, set MODELWORKS_DATA_DIR / --data-dir, or allow data.download")
    images, labels = read_header(paths[0]), read_header(paths[1])
    if len(images.dims) != 3 or len(labels.dims) != 1:
        raise DataError(f"{paths[0]} / {paths[1]}: expected 3-D images and 1-D labels, got "
                        f"{images.dims} and {labels.dims}")
    if images.dims[0] != labels.dims[0]:
        raise DataError(f"{name} {split}: {images.dims[0]} images but {labels.dims[0]} labels "
                        f"({paths[0].name} vs {paths[1].name}); the files do not belong together")
    pair = IdxPair(images, labels)
    if check_sizes:
        pair.check_sizes()
    return pair
