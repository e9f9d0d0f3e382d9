"""The ProgressBoard actor of progress.py: rank 0 of a training step pushes its events there, the driver
takes them.

A module of its own that imports only Ray: the actor's process imports the module that defines its class,
and progress.py imports Ray Train (for its controller callback), which would cost that process ~0.8 s of CPU
on 2 cores at the moment Ray Train's own processes start.
"""
from __future__ import annotations

import ray


@ray.remote(num_cpus=0)  # Ray: a tiny actor, no CPU reserved (it only holds a list)
class ProgressBoard:
    def __init__(self) -> None:
        self._events: list[dict] = []

    def push(self, event: dict) -> None:
        self._events.append(event)

    def take(self) -> list[dict]:
        events, self._events = self._events, []
        return events
