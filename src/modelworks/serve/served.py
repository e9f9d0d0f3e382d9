"""What a replica serves: one registry version, loaded and checked by the one checkpoint loader, with the input
spec its requests are validated against. No Ray: app.py's ModelServer holds one and swaps it whole."""
import time
from dataclasses import dataclass
from typing import Any

from modelworks.config import ServeConfig
from modelworks.serve import schemas
from modelworks.serve.generate_schemas import GenerateSpec
from modelworks.serve.schemas import InputSpec, TableSpec, TextSpec


@dataclass(frozen=True)
class Served:
    """One loaded registry version; swapped as a whole so a batch never sees half an update."""
    ref: str
    name: str
    version: int
    model: Any            # checkpoint.LoadedModel
    spec: InputSpec | TextSpec | TableSpec | GenerateSpec
    class_names: tuple[str, ...]
    loaded_at: float

    @property
    def language_model(self) -> bool:
        return isinstance(self.spec, GenerateSpec)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def load_served(ref: str, registry: str | None, cfg: ServeConfig) -> Served:
    """Resolve and load from the registry (checksums verified by the one loader)."""
    from modelworks.registry import Registry

    reg = Registry(registry)
    name, version = reg.resolve(ref)
    loaded, version = reg.load(f"{name}@{version}")
    source = (loaded.config.get("data") or {}).get("source")
    if loaded.spec.get("head") == "lm":  # a language model: /generate, with its character vocabulary
        spec = GenerateSpec(loaded.preprocessor.chars, cfg.max_prompt_chars, cfg.max_new_tokens)
    else:
        spec = schemas.spec_for(loaded.preprocessor, source, cfg.max_inputs, cfg.max_text_chars)
    return Served(ref, name, version, loaded, spec, tuple(map(str, loaded.class_names)), time.time())
