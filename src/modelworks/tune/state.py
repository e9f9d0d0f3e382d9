"""A whole copy of Tune's driver state that a SIGKILL cannot tear, for `modelworks tune --resume`.

Tune saves its experiment state (the trial list) and its searcher state (which trials were generated) into
a driver staging directory, then a background thread copies that directory onto the storage path,
rewriting each file in place. A driver killed while that copy runs leaves a truncated or mismatched pair
on the storage path (seen on CI: a resumed 4-trial search that knew only 1 trial). `StateMirror` copies
the staging directory in the driver loop itself, right after Tune saved it (Tune calls `on_step_end` after
its per-step save), into a new directory that replaces the previous copy by rename; `restore_mirror` puts
that copy back onto the storage path before `Tuner.restore` reads it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ray import tune

from modelworks.ray_private import TUNE_STATE_FILE, tune_driver_staging_path

MIRROR_DIR = "tune_state"  # inside the search directory
MIRROR_EVERY_S = 0.5  # at most this often: the copy is ~100 KB per search and Tune steps every ~0.1 s


class StateMirror(tune.Callback):
    def __init__(self, search_dir: str, every_s: float = MIRROR_EVERY_S):
        self.dest = Path(search_dir) / MIRROR_DIR
        self.every_s = every_s
        self._last = float("-inf")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if not trials or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        staging = tune_driver_staging_path(trials[0])
        if staging.is_dir():
            mirror(staging, self.dest)


def mirror(staging: Path, dest: Path) -> None:
    """Copy `staging` (files and trial log directories, no checkpoints) to `dest`, replacing it whole."""
    new, old = dest.with_name(dest.name + ".new"), dest.with_name(dest.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    shutil.copytree(staging, new, ignore=shutil.ignore_patterns("tmp-*", "checkpoint_*"))
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)  # killed between these two renames: `old` is the whole copy (see _newest)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _newest(search_dir: Path) -> Path | None:
    for name in (MIRROR_DIR, MIRROR_DIR + ".old"):  # never ".new": it may be half-written
        if (search_dir / name).is_dir():
            return search_dir / name
    return None


def restore_mirror(search_dir: Path) -> bool:
    """Put the last whole copy of Tune's state back onto the storage path. False when there is none
    (a search started before modelworks kept one: Tune's own copy is used as it is)."""
    src = _newest(search_dir)
    if src is None:
        return False
    # A state file the copy lacks is from a driver killed before its first copy: set it aside, or Tune
    # would read it (the newest session wins) instead of the whole copy.
    stale = search_dir / (MIRROR_DIR + ".stale")
    for path in search_dir.iterdir():
        if path.is_file() and TUNE_STATE_FILE.match(path.name) and not (src / path.name).is_file():
            stale.mkdir(exist_ok=True)
            os.replace(path, stale / path.name)
    for path in src.rglob("*"):
        if path.is_file():
            target = search_dir / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.mw-tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)  # each file whole, never a truncated one
    return True
