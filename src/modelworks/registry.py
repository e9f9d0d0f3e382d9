"""Model registry: immutable numbered versions and movable aliases (``latest``, ``production``).

Root: ``MODELWORKS_REGISTRY`` (a local path or any pyarrow filesystem URI, e.g. ``s3://bucket/models``),
else ``$MODELWORKS_HOME/registry`` (default ``~/.modelworks/registry``). Layout::

    <root>/<name>/<version>/checkpoint/...   the checkpoint directory (see checkpoint.py)
    <root>/<name>/<version>/artifacts/...    report.md, plots, trial table
    <root>/<name>/<version>/version.json     metadata; written last, so its presence marks a complete version
    <root>/<name>/aliases.json               {"latest": 3, "production": 2}

Models are always read through ``load``, which verifies the checksums.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from modelworks import checkpoint
from modelworks.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def home() -> Path:
    return Path(os.environ.get("MODELWORKS_HOME") or Path.home() / ".modelworks")


def default_root() -> str:
    return os.environ.get("MODELWORKS_REGISTRY") or str(home() / "registry")


class Registry:
    def __init__(self, root: str | None = None):
        root = root or default_root()
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).resolve())
        self.uri = root
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths and small files ---------------------------------------------------------------------
    def _p(self, *parts: Any) -> str:
        return "/".join([self.root.rstrip("/"), *map(str, parts)])

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read_json(self, path: str, default: Any = None) -> Any:
        if not self._exists(path):
            return default
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def _write_json(self, path: str, value: Any) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(value, indent=2).encode())
        self.fs.move(tmp, path)  # atomic rename on local disk; a single PUT on object storage

    # -- reading ------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self._exists(self.root):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.root))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def versions(self, name: str) -> list[int]:
        base = self._p(name)
        if not self._exists(base):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base))
        found = [int(i.base_name) for i in infos if i.type == pafs.FileType.Directory and i.base_name.isdigit()]
        return sorted(v for v in found if self._exists(self._p(name, v, "version.json")))

    def aliases(self, name: str) -> dict[str, int]:
        return self._read_json(self._p(name, "aliases.json"), {})

    def resolve(self, ref: str) -> tuple[str, int]:
        """``name``, ``name@3`` or ``name@production`` -> (name, version). ``name`` alone means latest."""
        name, _, tag = ref.partition("@")
        tag = tag or "latest"
        if not self.versions(name):
            known = ", ".join(self.models()) or "none yet; run a workflow first"
            raise UserError(f"model '{name}' is not in the registry at {self.uri} (models: {known})")
        if tag.isdigit():
            if int(tag) not in self.versions(name):
                raise UserError(f"model '{name}' has no version {tag} (versions: {self.versions(name)})")
            return name, int(tag)
        aliases = self.aliases(name)
        if tag not in aliases:
            raise UserError(f"model '{name}' has no alias '{tag}' (aliases: {', '.join(aliases) or 'none'}); "
                            f"use name@VERSION or promote a version first")
        return name, aliases[tag]

    def info(self, name: str, version: int) -> dict:
        meta = self._read_json(self._p(name, version, "version.json"))
        meta["aliases"] = sorted(a for a, v in self.aliases(name).items() if v == version)
        return meta

    def checkpoint_dir(self, name: str, version: int) -> Path:
        """A local directory holding the version's checkpoint (copied into a cache for remote registries)."""
        src = self._p(name, version, "checkpoint")
        if self.local:
            return Path(src)
        # Keyed by the registry too: two buckets can both hold a digits@1.
        dst = home() / "registry-cache" / hashlib.sha256(self.uri.encode()).hexdigest()[:12] / name / str(version)
        return checkpoint.fetch(self.fs, src, dst)

    def artifacts_dir(self, name: str, version: int) -> str:
        return self._p(name, version, "artifacts")

    def load(self, ref: str) -> tuple[checkpoint.LoadedModel, int]:
        name, version = self.resolve(ref)
        return checkpoint.load(self.checkpoint_dir(name, version)), version

    # -- writing ------------------------------------------------------------------------------------
    def _allocate(self, name: str) -> int:
        """Reserve the next version number; mkdir is atomic locally, so concurrent registers never share one."""
        version = max(self.versions(name) + [0]) + 1
        while True:
            path = self._p(name, version)
            if self.local:
                try:
                    os.makedirs(self._p(name), exist_ok=True)
                    os.mkdir(path)
                    return version
                except FileExistsError:
                    version += 1
            elif not self._exists(path):
                self.fs.create_dir(path)
                return version
            else:
                version += 1

    def register(self, name: str, checkpoint_path: str | Path, artifacts: str | Path | None = None,
                 meta: dict | None = None, aliases: tuple[str, ...] = ("latest",)) -> int:
        if not NAME_RE.match(name):
            raise UserError(f"model name '{name}' must match {NAME_RE.pattern}")
        checkpoint.verify(checkpoint_path)  # never register something the loader would refuse
        version = self._allocate(name)
        self._upload(Path(checkpoint_path), self._p(name, version, "checkpoint"))
        if artifacts and Path(artifacts).is_dir():
            self._upload(Path(artifacts), self._p(name, version, "artifacts"))
        record = {"name": name, "version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "source_checkpoint": str(checkpoint_path), **(meta or {})}
        self._write_json(self._p(name, version, "version.json"), record)
        for alias in aliases:
            self.set_alias(name, alias, version)
        return version

    def _upload(self, src: Path, dst: str) -> None:
        self.fs.create_dir(dst, recursive=True)
        pafs.copy_files(str(src.resolve()), dst, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        if self.local:  # versions are immutable: make the files read-only
            for f in Path(dst).rglob("*"):
                if f.is_file():
                    f.chmod(0o444)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        if version not in self.versions(name):
            raise UserError(f"model '{name}' has no version {version} (versions: {self.versions(name)})")
        if alias.isdigit() or not NAME_RE.match(alias):
            raise UserError(f"alias '{alias}' must be a name like 'production', not a number")
        current = self.aliases(name)
        current[alias] = version
        self._write_json(self._p(name, "aliases.json"), current)
