"""The evaluate step of a language model: next-token loss and perplexity on the whole validation text,
its loss curves by step, and samples, into ``report.md`` / ``report.html`` / ``val_metrics.json``.

The whole validation text is cut into consecutive windows of the model's context (the last one shorter),
so every character after the first is predicted exactly once (Tiny Shakespeare: 111,539 predictions),
each from the up to ``max_len - 1`` characters before it in its window. Training's evaluations use random
windows of the same length, which see the same spread of context lengths, so the figures are comparable.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from modelworks import checkpoint  # noqa: E402
from modelworks.evaluate import model_summary, write_html  # noqa: E402
from modelworks.models.generation import generate  # noqa: E402
from modelworks.train import list_checkpoints  # noqa: E402

SAMPLE_RANDOM_SEED = 0


@torch.no_grad()
def text_loss(model, ids: np.ndarray, context: int, batch_size: int = 256) -> tuple[float, float, int]:
    """(mean next-token loss, next-token accuracy, predictions) over ``ids`` in consecutive windows."""
    ids_t = torch.from_numpy(ids.astype(np.int64))
    n = len(ids_t) - 1  # predictions: every token but the first
    full = n // context
    loss_sum, correct = 0.0, 0
    x = ids_t[: full * context].view(full, context)
    y = ids_t[1: full * context + 1].view(full, context)
    parts = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, full, batch_size)]
    if n % context:  # the tail, one shorter window
        parts.append((ids_t[full * context: n][None], ids_t[full * context + 1: n + 1][None]))
    model.eval()
    for xb, yb in parts:
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), yb.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
    return loss_sum / n, correct / n, n


def samples(loaded: checkpoint.LoadedModel, prompts: list[str], new_tokens: int, temperature: float,
            top_k: int | None) -> list[dict]:
    out = []
    for prompt in prompts:
        ids = loaded.preprocessor.encode(prompt)
        new = list(generate(loaded.model, ids.tolist(), new_tokens, temperature=temperature, top_k=top_k,
                            random_seed=SAMPLE_RANDOM_SEED))
        out.append({"prompt": prompt, "text": loaded.preprocessor.decode(new)})
    return out


def plot_loss(history: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        ax.plot([h["step"] for h in history], [h[key] for h in history], marker="o", label=key)
    ax.set(xlabel="step", ylabel="next-token loss (nats)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_language_model(ckpt: Path, val_text: str, out: Path, run_name: str) -> dict:
    """Everything the evaluate step leaves in ``out``; returns val_loss, val_perplexity, val_accuracy,
    val_tokens (and the samples)."""
    out.mkdir(parents=True, exist_ok=True)
    loaded = checkpoint.load(ckpt)
    cfg = loaded.config
    loss, accuracy, n = text_loss(loaded.model, loaded.preprocessor.encode(val_text), loaded.spec["max_len"])
    ev = cfg["evaluate"]
    metrics = {"val_loss": loss, "val_perplexity": math.exp(loss), "val_accuracy": accuracy, "val_tokens": n,
               "samples": samples(loaded, [p for p in ev["sample_prompts"] if not loaded.preprocessor.unknown(p)],
                                  ev["sample_tokens"], ev["sample_temperature"], ev["sample_top_k"])}
    (out / "val_metrics.json").write_text(json.dumps(metrics, indent=2))
    history = loaded.metrics.get("history", [])
    done = list_checkpoints(ckpt.parent)  # curves cover the whole run, also steps after the best checkpoint
    if done:
        history = json.loads((done[-1][1] / "metrics.json").read_text()).get("history", history)
    plot_loss(history, out / "loss_curve.png")
    write_report(out, run_name, ckpt, metrics, history, cfg)
    return metrics


def write_report(out: Path, run_name: str, ckpt: Path, metrics: dict, history: list[dict], config: dict) -> Path:
    ev = config["evaluate"]
    lines = [
        f"# {config['name']}: run `{run_name}`",
        "",
        f"- best checkpoint (by val_loss on {config['train']['eval_batches']} validation batches): `{ckpt.name}`",
        f"- **validation loss: {metrics['val_loss']:.4f}** (perplexity {metrics['val_perplexity']:.2f}, next-token "
        f"accuracy {metrics['val_accuracy']:.4f}) on the whole validation text: {metrics['val_tokens']:,} predictions",
        f"- model: {model_summary(config['model'])}",
        f"- training: {config['train']}",
        "",
        "| step | train loss | val loss | val perplexity | lr | tokens/s |",
        "|---|---|---|---|---|---|",
        *[f"| {h['step']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {h['val_perplexity']:.2f} | {h['lr']:.2e} | "
          f"{h['tokens_per_s']:.0f} |" for h in history],
        "",
        "![loss](loss_curve.png)",
        "",
        f"## Samples (temperature {ev['sample_temperature']}, top_k {ev['sample_top_k']}, random seed "
        f"{SAMPLE_RANDOM_SEED})",
        "",
    ]
    for s in metrics["samples"]:
        lines += ["```", s["prompt"] + s["text"], "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    write_html(out / "report.html", "\n".join(lines), out, title=f"{config['name']}: {run_name}")
    return path
