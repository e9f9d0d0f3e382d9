"""What a built-in step receives (``Context``) and returns (``Output``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from modelworks.config import WorkflowConfig


@dataclass
class Output:
    value: dict               # JSON: what the manifest records, the cache keeps and a user step receives
    files: list[str]          # the step's files, relative to the run folder (kept by the cache)
    obj: Any = None           # the in-memory result for the built-in steps downstream (never cached)
    result: str = ""          # the console's one line about it


@dataclass
class Context:
    cfg: WorkflowConfig
    run_dir: Path
    data_dir: str | None
    console: Any                                   # modelworks.console.Console
    values: dict[str, dict] = field(default_factory=dict)
    loaders: dict[str, Callable] = field(default_factory=dict)   # step -> load(ctx, value) -> object
    objects: dict[str, Any] = field(default_factory=dict)
    number: dict[str, str] = field(default_factory=dict)         # step -> "[i/n]" for the console
    options: dict = field(default_factory=dict)                  # run options a step reads (search: resume)

    def value(self, step: str) -> dict:
        return self.values[step]

    def obj(self, step: str) -> Any:
        """The step's in-memory result: as it returned it in this process, or rebuilt from its files (the
        step was a cache hit, or finished in an earlier attempt of this run)."""
        if step not in self.objects:
            self.objects[step] = self.loaders[step](self, self.values[step])
        return self.objects[step]
