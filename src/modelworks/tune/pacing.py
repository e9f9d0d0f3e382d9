"""Pacing the trials at ASHA's rungs, and each trial's own log of events (``attempts/<trial>.jsonl``) that the
pacing, the trial table and ``--resume`` read.

ASHA judges a result against those already recorded at its rung, and the first one always passes; a trial
that reaches a rung therefore waits there (``trial.ModelworksTrial._wait_at_rung``) until every running peer
has reported it too (``peers_behind``), so a rung's results reach ASHA together.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from modelworks.config import WorkflowConfig
from modelworks.tune.space import max_epochs


def asha_rungs(cfg: WorkflowConfig) -> list[int]:
    """The epochs at which ASHA judges a trial (grace_period * reduction_factor**k below max_epochs)."""
    s = cfg.search
    if s.scheduler != "asha":
        return []
    top, rung, out = max_epochs(cfg), min(s.grace_period, max_epochs(cfg)), []
    while rung < top:
        out.append(rung)
        rung *= s.reduction_factor
    return out


# A trial waits at most this long at a rung for peers that stopped reporting (a crashed peer on another node).
PACE_TIMEOUT_S = 600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, not ours
        return True
    return True


def attempts_path(search_dir: Path, trial_id: str) -> Path:
    """Each trial's own log of events (start, epoch, end, ...), one JSON object a line."""
    return search_dir / "attempts" / f"{trial_id}.jsonl"


def read_attempts(path: Path) -> list[dict]:
    """The events in one attempts file, in order; a half-written line (being written now, or left by a
    killed process) is skipped."""
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def peers_behind(search_dir: Path, session: str, me: str, epoch: int) -> list[str]:
    """Trials of this driver session that are running (started, not ended, process alive) and have not yet
    reported `epoch`. Trials not started yet (beyond the concurrency cap) are not waited for."""
    behind = []
    for f in (search_dir / "attempts").glob("*.jsonl"):
        trial = f.stem
        if trial == me:
            continue
        started = ended = False
        pid = host = None
        events = read_attempts(f)
        reached = reported_epoch(events)
        for e in events:
            if e.get("session") == session:
                if e["event"] == "start":
                    started, ended, pid, host = True, False, e.get("pid"), e.get("host")
                elif e["event"] == "end":
                    ended = True
        alive = started and not ended and not (host == socket.gethostname() and pid and not _pid_alive(pid))
        if alive and reached < epoch:
            behind.append(trial)
    return behind


def reported_epoch(events: list[dict]) -> int:
    """The last epoch a trial reported to Tune (or went on from after a resume), from its attempts log."""
    return max([e["epoch"] for e in events if e["event"] == "epoch"]
               + [e["from_epoch"] for e in events if e["event"] == "resume"], default=0)


def append_event(search_dir: Path, trial_id: str, record: dict) -> None:
    """Append one event (with its time) to a trial's attempts log. A line left half-written by a killed
    attempt is ended first, so this record is never glued to it."""
    path = attempts_path(search_dir, trial_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), **record}) + "\n"
    with path.open("ab+") as f:  # writes append; reads go anywhere
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
