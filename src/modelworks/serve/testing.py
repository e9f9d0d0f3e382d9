"""Small registered models for serve tests and the serve benchmark, built in seconds without Ray Train.

``register_digits`` trains the digits MLP (8x8 inputs, 0..16 pixel scale) in-process on scikit-learn's
digits for a few hundred full-batch steps and registers it through the normal checkpoint + registry path
(checksums and all). ``register_mnist_shaped`` registers the seed's 784-256-128-10 MLP (or wider ``hidden``
layers) with random weights: a stand-in for throughput measurements when no trained MNIST model is registered.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from modelworks import checkpoint
from modelworks.data.preprocess import Preprocessor
from modelworks.models import build_model
from modelworks.registry import Registry
from modelworks.serve import free_port  # noqa: F401 - tests and benchmarks bind free ports, never 8000


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)  # (1797, 8, 8) in 0..16


def _register(reg: Registry, name: str, model, spec: dict, pre: Preprocessor, metrics: dict,
              config: dict, aliases=("latest",)) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.save(Path(tmp) / "ckpt", model=model, spec=spec, preprocessor=pre, metrics=metrics,
                               config=config)
        return reg.register(name, ckpt, meta={"test_accuracy": metrics.get("test_accuracy")}, aliases=aliases)


def register_digits(reg: Registry, name: str = "digits", *, steps: int = 300, seed: int = 0,
                    hidden=(32,), aliases=("latest",)) -> int:
    torch.manual_seed(seed)
    x, y = digits_data()
    pre = Preprocessor([8, 8], float(x.mean()), float(x.std()), list(range(10)), [str(i) for i in range(10)])
    spec = {"name": "mlp", "input_dim": 64, "num_classes": 10, "hidden_sizes": list(hidden), "dropout": 0.0}
    model = build_model(spec)
    xt, yt = torch.from_numpy(pre.transform_features(x)), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    metrics = {"val_accuracy": acc, "test_accuracy": acc, "epoch": 1}
    config = {"name": name, "data": {"source": "digits"}}
    return _register(reg, name, model, spec, pre, metrics, config, aliases)


def register_mnist_shaped(reg: Registry, name: str = "mnist-bench", seed: int = 0, aliases=("latest",),
                          hidden=(256, 128)) -> int:
    torch.manual_seed(seed)
    pre = Preprocessor([28, 28], 33.3, 78.6, list(range(10)), [str(i) for i in range(10)])
    spec = {"name": "mlp", "input_dim": 784, "num_classes": 10, "hidden_sizes": list(hidden), "dropout": 0.0}
    model = build_model(spec).eval()
    metrics = {"val_accuracy": 0.0, "test_accuracy": 0.0, "epoch": 0, "note": "random weights (benchmark stand-in)"}
    return _register(reg, name, model, spec, pre, metrics, {"name": name, "data": {"source": "idx"}}, aliases)


def running_replicas(app: str) -> int:
    """RUNNING replicas of the ModelServer deployment of Serve application ``app``."""
    from ray import serve

    from modelworks.serve.app import DEPLOYMENT

    return serve.status().applications[app].deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)
