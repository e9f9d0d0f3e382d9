"""The step cache: a step whose inputs have not changed reuses its outputs instead of running again.

A step's **key** is a hash of everything it reads: the config fields it declares, the fingerprints of its
input files (ingest: size + SHA-256 of each data file, or size + modification time for object storage),
the keys of the steps it consumes (so a change reruns exactly what is downstream of it), and the code
version (the hash of modelworks' own source, plus a user step's source).

Layout, under ``$MODELWORKS_HOME/cache`` (safe to share between runs)::

    <step>/<key>/entry.json   the output value, the files' relative paths, which run made it
    <step>/<key>/files/...    the step's files, hard links to the run that made them (copies across devices)

An entry is built in ``<step>/.<key>.<pid>.tmp`` and renamed into place in one step, with ``entry.json``
written last inside it: a crash mid-write leaves a temporary folder that is never read, and of two runs
that publish the same key at once, the first rename wins and the other drops its copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import modelworks
from modelworks.checkpoint import sha256

FORMAT = 1  # bump when a step's outputs change shape: every old entry misses then


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def fingerprint(paths: list[str]) -> list[dict]:
    """Size and content hash of each local file (each file under a folder); size and modification time for
    an object-store URI, whose content is not downloaded just to be hashed."""
    out = []
    for p in paths:
        if "://" in p:
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(p)
            info = fs.get_file_info(inner)
            out.append({"path": p, "size": info.size, "mtime": str(info.mtime)})
            continue
        path = Path(p)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                out.append({"path": str(f), "size": f.stat().st_size, "sha256": sha256(f)})
    return out


@cache
def code_version() -> dict:
    """The source hash of the installed modelworks package (what the cache key uses: it changes with any
    edit, committed or not), and for the manifest the git commit when running from a checkout."""
    root = Path(modelworks.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    from importlib.metadata import PackageNotFoundError, version
    try:
        package = version("modelworks")
    except PackageNotFoundError:
        package = None
    return {"source_hash": h.hexdigest()[:16], "git_commit": commit, "package_version": package}


@dataclass
class Entry:
    step: str
    key: str
    path: Path
    value: dict
    files: list[str]
    run: str

    def restore(self, run_dir: Path) -> None:
        """Put the entry's files into ``run_dir`` (hard links; skipped where the run has them already)."""
        for rel in self.files:
            _link_tree(self.path / "files" / rel, run_dir / rel)


def _link_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


class CacheStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def lookup(self, step: str, key: str) -> Entry | None:
        path = self.root / step / key
        try:
            meta = json.loads((path / "entry.json").read_text())
        except (OSError, ValueError):
            return None  # absent, or (never by us) unreadable: a miss either way
        if meta.get("format") != FORMAT or not all((path / "files" / f).exists() for f in meta["files"]):
            return None
        return Entry(step, key, path, meta["value"], meta["files"], meta.get("run", ""))

    def publish(self, step: str, key: str, run_dir: Path, files: list[str], value: dict) -> Entry:
        """Keep a finished step's files and value under its key (see the module docstring for why it is
        safe against crashes and concurrent runs)."""
        final = self.root / step / key
        tmp = self.root / step / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for rel in files:
            _link_tree(run_dir / rel, tmp / "files" / rel)
        (tmp / "files").mkdir(parents=True, exist_ok=True)
        (tmp / "entry.json").write_text(json.dumps({"format": FORMAT, "step": step, "key": key, "value": value,
                                                    "files": files, "run": run_dir.name}, indent=2, default=str))
        try:
            tmp.rename(final)
        except OSError:  # published meanwhile by another run (or a stale entry of an older format)
            if self.lookup(step, key) is None:
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        return self.lookup(step, key)
