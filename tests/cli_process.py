"""A `modelworks` CLI process for tests that serve: started in its own session, its output collected as it
comes, stopped with SIGTERM (and killed with its process group if it does not stop)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


class CliProcess:
    def __init__(self, *args: str, env: dict | None = None):
        from modelworks.serve import LOCAL_PORT_VARS

        # The child starts its own private Ray: it must pick its own Serve side ports, not this session's.
        base = {k: v for k, v in os.environ.items() if k not in LOCAL_PORT_VARS}
        self.proc = subprocess.Popen([sys.executable, "-m", "modelworks.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**base, **(env or {})},
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.time() + timeout
        while True:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}):\n{self.output[-3000:]}"
            assert time.time() < deadline, f"no line starting {prefix!r} within {timeout} s:\n{self.output[-3000:]}"
            time.sleep(0.3)

    def terminate(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
