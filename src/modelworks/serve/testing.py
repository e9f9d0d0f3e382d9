"""Small registered models for serve tests and the serve benchmark, built in seconds without Ray Train.

``register_digits`` trains the digits MLP (8x8 inputs, 0..16 pixel scale) in-process on scikit-learn's
digits for a few hundred full-batch steps and registers it through the normal checkpoint + registry path
(checksums and all). ``register_mnist_shaped`` registers the seed's 784-256-128-10 MLP (or wider ``hidden``
layers) with random weights: a stand-in for throughput measurements when no trained MNIST model is registered.
``register_text`` fits a BPE tokenizer and trains a one-layer Transformer sentiment classifier on 40
short sentences (a second or two); ``register_text_shaped`` registers an SST-2-sized Transformer with random
weights for the benchmark.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from modelworks import checkpoint
from modelworks.config import DataConfig, ModelConfig, WorkflowConfig
from modelworks.data import text
from modelworks.data.preprocess import Preprocessor
from modelworks.models import build_model
from modelworks.registry import Registry
from modelworks.serve import free_port  # noqa: F401 - tests and benchmarks bind free ports, never 8000


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)  # (1797, 8, 8) in 0..16


def register_model(reg: Registry, name: str, model, spec: dict, pre, metrics: dict, config: dict,
                   aliases=("latest",), meta: dict | None = None) -> int:
    """Save ``model`` as a checkpoint and register it (registry meta: ``meta``, default its test accuracy)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.save(Path(tmp) / "ckpt", model=model, spec=spec, preprocessor=pre, metrics=metrics,
                               config=config)
        meta = {"test_accuracy": metrics.get("test_accuracy")} if meta is None else meta
        return reg.register(name, ckpt, meta=meta, aliases=aliases)


def register_digits(reg: Registry, name: str = "digits", *, steps: int = 300, random_seed: int = 0,
                    hidden=(32,), aliases=("latest",)) -> int:
    torch.manual_seed(random_seed)
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
    return register_model(reg, name, model, spec, pre, metrics, config, aliases)


def register_mnist_shaped(reg: Registry, name: str = "mnist-bench", random_seed: int = 0, aliases=("latest",),
                          hidden=(256, 128)) -> int:
    torch.manual_seed(random_seed)
    pre = Preprocessor([28, 28], 33.3, 78.6, list(range(10)), [str(i) for i in range(10)])
    spec = {"name": "mlp", "input_dim": 784, "num_classes": 10, "hidden_sizes": list(hidden), "dropout": 0.0}
    model = build_model(spec).eval()
    metrics = {"val_accuracy": 0.0, "test_accuracy": 0.0, "epoch": 0, "note": "random weights (benchmark stand-in)"}
    return register_model(reg, name, model, spec, pre, metrics, {"name": name, "data": {"source": "idx"}}, aliases)


# Sentiment sentences for the tiny text model: every adjective in two templates, so the tokenizer keeps whole words.
POSITIVE_WORDS = ("gorgeous", "witty", "moving", "brilliant", "charming", "delightful", "funny", "touching",
                  "superb", "wonderful")
NEGATIVE_WORDS = ("dull", "tedious", "boring", "clumsy", "lifeless", "awful", "tiresome", "bland", "messy",
                  "painful")
TEXT_CLASS_NAMES = {"0": "negative", "1": "positive"}


def sentiment_data() -> tuple[list[str], list[int]]:
    """40 short sentences, labels 1 (positive) / 0 (negative)."""
    texts, labels = [], []
    for label, words in ((1, POSITIVE_WORDS), (0, NEGATIVE_WORDS)):
        for w in words:
            texts += [f"a {w} film", f"the story is {w} from start to end"]
            labels += [label, label]
    return texts, labels


def _text_config(name: str, spec: dict, vocab_size: int) -> dict:
    """A full, valid workflow config for a registered text classifier (what a real run would save)."""
    model = ModelConfig(name="transformer", vocab_size=vocab_size,
                        **{k: spec[k] for k in ("d_model", "n_layers", "n_heads", "d_ff", "max_len", "dropout",
                                                "pooling", "use_sdpa")})
    cfg = WorkflowConfig(name=name, data=DataConfig(source="text", name=name), model=model)
    return cfg.model_dump(mode="json")


def _text_spec(pre, **sizes) -> dict:
    """A classifier spec whose vocabulary, length and classes come from the fitted preprocessor."""
    return {"name": "transformer", "head": "classify", "vocab_size": pre.vocab_size, "max_len": pre.max_len,
            "dropout": 0.0, "pad_id": text.PAD_ID, "pooling": "mean", "use_sdpa": True,
            "num_classes": pre.num_classes, **sizes}


def register_text(reg: Registry, name: str = "sentiment", *, steps: int = 60, random_seed: int = 0,
                  aliases=("latest",)) -> int:
    """A tiny real sentiment classifier (negative/positive), trained on ``sentiment_data`` with plain torch."""
    torch.manual_seed(random_seed)
    texts, labels = sentiment_data()
    vocab_size = 200
    pre = text.fit(texts, labels, TEXT_CLASS_NAMES, vocab_size=vocab_size, max_len=32)
    spec = _text_spec(pre, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    model = build_model(spec)
    ids, y = pre.to_model_input(texts), torch.tensor(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # One intra-op thread: on a busy 2-core machine OpenMP threads of so small a model spin against each other
    # (measured: 1.2 s per step with 2 threads, 20 ms with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(ids), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(ids).argmax(1) == y).float().mean())
    finally:
        torch.set_num_threads(threads)
    metrics = {"val_accuracy": acc, "test_accuracy": acc, "epoch": 1}
    return register_model(reg, name, model, spec, pre, metrics, _text_config(name, spec, vocab_size), aliases)


def register_text_shaped(reg: Registry, texts: list[str], name: str = "sst2-bench", *, vocab_size: int = 8000,
                         max_len: int = 64, random_seed: int = 0, aliases=("latest",)) -> int:
    """An SST-2-sized Transformer classifier (128 wide, 4 layers, 4 heads) with a BPE tokenizer fitted on
    ``texts`` and random weights: a stand-in for throughput measurements."""
    torch.manual_seed(random_seed)
    pre = text.fit(texts, [0, 1], TEXT_CLASS_NAMES, vocab_size=vocab_size, max_len=max_len)
    spec = _text_spec(pre, d_model=128, n_layers=4, n_heads=4, d_ff=512)
    model = build_model(spec).eval()
    metrics = {"val_accuracy": 0.0, "test_accuracy": 0.0, "epoch": 0, "note": "random weights (benchmark stand-in)"}
    return register_model(reg, name, model, spec, pre, metrics, _text_config(name, spec, vocab_size), aliases)


def running_replicas(app: str) -> int:
    """RUNNING replicas of the ModelServer deployment of Serve application ``app``."""
    from ray import serve

    from modelworks.serve.app import DEPLOYMENT

    return serve.status().applications[app].deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)
