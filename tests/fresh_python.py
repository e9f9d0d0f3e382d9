"""Probes that need an interpreter of their own: what a module imports, what a process sees at start."""
from __future__ import annotations

import json
import subprocess
import sys


def run_python(code: str, *args: str, env: dict | None = None, timeout: float = 120):
    """Runs ``code`` in a fresh interpreter (what it imports is its own); returns the JSON its last line prints."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
