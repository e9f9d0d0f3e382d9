"""A run's lineage, ``runs/<run>/manifest.json``: for every step its status, start and end, resources, the
inputs its cache key covers (config fields, data fingerprints, upstream keys, code version), its outputs
(files, value: checkpoint, metrics, registry version) and whether they came from the cache. Rewritten
whole (temporary file + rename) after every change, so a reader never sees half a manifest, and a crash
leaves the last consistent state.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

FILE = "manifest.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    def __init__(self, run_dir: Path, *, run: str, workflow: str, config: dict, config_digest: str, code: dict,
                 steps: list[str]):
        self.path = Path(run_dir) / FILE
        self._t0 = time.time()
        previous = read(run_dir)
        self.data = {
            "format": 1, "run": run, "workflow": workflow, "config": config, "config_digest": config_digest,
            "code": code, "status": "running", "started": now(), "finished": None, "seconds": None,
            # A rerun of the same run keeps the history of its earlier attempts.
            "attempts": (previous.get("attempts", []) + [{k: previous.get(k) for k in
                                                           ("started", "finished", "status")}]) if previous else [],
            "steps": [{"name": s, "status": "pending"} for s in steps],
            "metrics": {}, "model": None,
        }
        self.write()

    def step(self, name: str) -> dict:
        return next(s for s in self.data["steps"] if s["name"] == name)

    def start(self, name: str, **fields) -> None:
        self.step(name).update(status="running", started=now(), **fields)
        self.write()

    def finish(self, name: str, *, status: str, seconds: float, **fields) -> None:
        self.step(name).update(status=status, finished=now(), seconds=round(seconds, 3), **fields)
        self.write()

    def close(self, status: str, **fields) -> None:
        self.data.update(status=status, finished=now(), seconds=round(time.time() - self._t0, 2), **fields)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def read(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return {}


def lineage(registry_meta: dict) -> dict | None:
    """Where a registered version came from, back to its data files: from the manifest of the run that
    registered it (``registry_meta["lineage"]``, written by the register step). None for older versions."""
    link = registry_meta.get("lineage") or {}
    found = read(Path(link["manifest"]).parent) if link.get("manifest") else {}
    if not found:
        return None
    data = next((s.get("inputs", {}).get("data", []) for s in found["steps"] if s["name"] == "ingest"), [])
    return {"run": found["run"], "manifest": link["manifest"], "workflow": found["workflow"],
            "config_digest": found["config_digest"], "code": found["code"],
            "data": [{k: f.get(k) for k in ("path", "size", "sha256", "mtime") if k in f} for f in data],
            "steps": [{"name": s["name"], "status": s.get("status"), "cache": s.get("cache"), "key": s.get("key"),
                       "cached_from": s.get("cached_from")} for s in found["steps"]]}
