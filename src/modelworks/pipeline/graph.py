"""A workflow as a graph of named steps: what each step consumes, in which order they run, and how a user
adds a step of their own. Pure Python (no Ray), so the graph is built, validated and printed without a
cluster.

A step consumes the outputs of the steps named in ``inputs``; the runner (pipeline/runner.py) runs a step
once all of them have finished, so the order comes from the inputs, not from a list. A user step is a plain
function in the workflow file:

    @step(cpus=1)
    def confusion_note(evaluate, out_dir):
        ...                       # `evaluate` is that step's output value (a dict)
        return {"worst_class": 3}   # this step's output value; files written to out_dir are its files

Its parameters name the steps it consumes, plus two that the runner fills in: ``config`` (the workflow
config as a dict) and ``out_dir`` (a folder for the step's files). It runs as a Ray task with the
resources it asks for, and its return value must be JSON (it is cached and written to the manifest).
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

from modelworks.errors import UserError

# Parameters of a user step that are not step names: the runner passes these itself.
RESERVED_PARAMS = ("config", "out_dir")


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int | None = None

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"] + ([f"{self.gpus:g} GPU"] if self.gpus else []) + \
                ([f"{self.memory_mb} MiB"] if self.memory_mb else [])
        return ", ".join(parts)


@dataclass
class Step:
    name: str
    inputs: tuple[str, ...]
    fn: Callable
    builtin: bool = False
    reads: tuple[str, ...] = ()    # config fields (dotted, or whole sections) that go into the cache key
    resources: Resources = field(default_factory=Resources)
    cache: bool = True
    about: str = ""                # one line for `--steps`
    # Built-in steps only (see pipeline/builtins.py):
    load: Callable | None = None         # (ctx, value) -> the in-memory result, rebuilt from the step's files
    detail: Callable | None = None       # (ctx) -> what a long step announces when it starts
    clear: Callable | None = None        # (ctx) -> remove outputs made for other inputs before rerunning
    still_valid: Callable | None = None  # (value) -> whether a cached output still stands (a registry version)

    def code_digest(self) -> str:
        """What of the code the cache key covers for a user step: its source (built-ins are covered by the
        package's source hash, see cache.code_version)."""
        try:
            text = inspect.getsource(self.fn)
        except (OSError, TypeError):
            text = getattr(self.fn, "__qualname__", repr(self.fn))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def step(fn: Callable | None = None, *, cpus: float = 1.0, gpus: float = 0.0, memory_mb: int | None = None,
         cache: bool = True, name: str | None = None):
    """Mark a function in a workflow file as a user step (``@step`` or ``@step(cpus=2)``)."""
    def mark(f: Callable) -> Callable:
        params = [p for p in inspect.signature(f).parameters if p not in RESERVED_PARAMS]
        f.modelworks_step = Step(name or f.__name__, tuple(params), f, builtin=False,
                                 resources=Resources(cpus, gpus, memory_mb), cache=cache,
                                 about=(inspect.getdoc(f) or "").split("\n")[0])
        return f
    return mark(fn) if fn is not None else mark


def user_steps(namespace: dict) -> list[Step]:
    """The steps a workflow module declares, in the order they appear in the file."""
    return [v.modelworks_step for v in namespace.values() if isinstance(getattr(v, "modelworks_step", None), Step)]


class Graph:
    def __init__(self, steps: list[Step]):
        self.steps: dict[str, Step] = {}
        for s in steps:
            if s.name in self.steps:
                raise UserError(f"two steps are named '{s.name}'; rename one (@step(name=...))")
            self.steps[s.name] = s
        for s in steps:
            unknown = [i for i in s.inputs if i not in self.steps]
            if unknown:
                raise UserError(f"step '{s.name}' consumes {', '.join(repr(u) for u in unknown)}, which no step "
                                f"produces; its parameters must be step names ({', '.join(self.steps)}) or "
                                f"{' / '.join(RESERVED_PARAMS)}")
        self.order = self._topological_order()

    def _topological_order(self) -> list[str]:
        """Kahn's algorithm, ties broken by declaration order so the printed graph is stable."""
        remaining = {n: set(s.inputs) for n, s in self.steps.items()}
        order: list[str] = []
        while remaining:
            ready = [n for n, deps in remaining.items() if deps <= set(order)]
            if not ready:
                raise UserError(f"steps {', '.join(sorted(remaining))} consume each other in a cycle; "
                                f"break it by removing one of those parameters")
            order.append(ready[0])
            del remaining[ready[0]]
        return order

    def downstream(self, name: str) -> set[str]:
        """The step and every step that consumes it, directly or not."""
        out, frontier = {name}, [name]
        while frontier:
            current = frontier.pop()
            for s in self.steps.values():
                if current in s.inputs and s.name not in out:
                    out.add(s.name)
                    frontier.append(s.name)
        return out

    def describe(self) -> list[str]:
        """One line per step, in run order: what it consumes and where it runs."""
        width = max(len(n) for n in self.order)
        lines = []
        for i, n in enumerate(self.order, start=1):
            s = self.steps[n]
            where = "driver (starts its own Ray work)" if s.builtin else f"Ray task ({s.resources.describe()})"
            after = f"<- {', '.join(s.inputs)}" if s.inputs else "(first)"
            lines.append(f"[{i}/{len(self.order)}] {n:<{width}}  {after:<28} {where}"
                         + (f"  {s.about}" if s.about else ""))
        return lines
