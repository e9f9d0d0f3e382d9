"""Model builders by name. A model spec (saved as model.json in every checkpoint) is
``{"name": ..., "num_classes": ..., **model config}`` plus what the preprocessor fixed (``input_dim`` for
the MLP; ``vocab_size``, ``pad_id`` and the head for the Transformer), and rebuilds the network."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from modelworks.models import transformer
from modelworks.models.mlp import MLP

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda spec: MLP(spec["input_dim"], spec["hidden_sizes"], spec["num_classes"], spec.get("dropout", 0.0)),
    "transformer": transformer.build,
}


def build_model(spec: dict[str, Any]) -> nn.Module:
    try:
        builder = BUILDERS[spec["name"]]
    except KeyError:
        raise ValueError(f"unknown model '{spec.get('name')}' (known: {', '.join(BUILDERS)})") from None
    return builder(spec)
