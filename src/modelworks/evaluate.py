"""Score a checkpoint on the held-out test split: metrics, confusion matrix (regression: predicted-vs-true
and residual plots), curves and report.md."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix, log_loss,  # noqa: E402
                             mean_absolute_error, r2_score, root_mean_squared_error)

from modelworks import checkpoint  # noqa: E402
from modelworks.train import list_checkpoints  # noqa: E402


def predict_split(loaded: checkpoint.LoadedModel, raw_test: ray.data.Dataset | dict, batch_size: int = 1024,
                  keep_inputs: bool = False, missing: dict | None = None):
    """Stream a raw split through the checkpoint's own preprocessor and model: (y, outputs[, inputs]), where
    outputs are class probabilities (N, C), or for regression predictions (N, 1) in the label's units. A table
    model counts the missing values it imputes per column into ``missing`` when given."""
    ys, probs, inputs = [], [], []
    column = loaded.preprocessor.raw_column
    if isinstance(raw_test, dict):  # arrays on the driver already (sources.IN_MEMORY_MAX_BYTES)
        n = len(raw_test["label"])
        batches = ({k: v[i:i + batch_size] for k, v in raw_test.items()} for i in range(0, n, batch_size))
    else:
        batches = raw_test.iter_batches(batch_size=batch_size, batch_format="numpy")
    for batch in batches:
        x = batch[column] if column else batch  # a table model reads its named columns
        ys.append(loaded.preprocessor.encode_labels(batch["label"]))
        probs.append(loaded.predict_outputs(x).numpy())
        if missing is not None:
            for name, n in loaded.preprocessor.missing_counts(loaded.preprocessor.frame(batch)).items():
                missing[name] = missing.get(name, 0) + n
        if keep_inputs:
            inputs += list(batch[column])
    y, p = np.concatenate(ys), np.concatenate(probs)
    return (y, p, inputs) if keep_inputs else (y, p)


def confidently_wrong(texts: list[str], y: np.ndarray, probs: np.ndarray, class_names: list[str],
                      n: int = 10) -> list[dict]:
    """The n wrong predictions the model was surest of: where a text model's blind spots show."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    return [{"text": texts[i], "true": class_names[y[i]], "predicted": class_names[pred[i]],
             "probability": float(probs[i, pred[i]])} for i in wrong]


def score(y: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    pred = probs.argmax(1)
    labels = list(range(len(class_names)))
    report = classification_report(y, pred, labels=labels, target_names=class_names, output_dict=True,
                                   zero_division=0)
    return {
        "test_accuracy": float(accuracy_score(y, pred)),
        "test_loss": float(log_loss(y, probs, labels=labels)),
        "test_samples": int(len(y)),
        "per_class": {name: {k: float(report[name][k]) for k in ("precision", "recall", "f1-score", "support")}
                      for name in class_names},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


def score_regression(y: np.ndarray, pred: np.ndarray, loaded: checkpoint.LoadedModel) -> dict:
    """MAE, RMSE and R² in the label's units (scikit-learn's metrics), and the training loss on the
    standardised label as test_loss."""
    pre = loaded.preprocessor
    ys, ps = (y - pre.target_center) / pre.target_scale, (pred - pre.target_center) / pre.target_scale
    huber = loaded.config.get("train", {}).get("loss") == "huber"
    err = np.abs(ps - ys)
    loss = np.where(err < 1, 0.5 * err**2, err - 0.5).mean() if huber else (err**2).mean()
    return {"test_mae": float(mean_absolute_error(y, pred)), "test_rmse": float(root_mean_squared_error(y, pred)),
            "test_r2": float(r2_score(y, pred)), "test_loss": float(loss), "test_samples": int(len(y)),
            "label_mean": float(np.mean(y)), "label_std": float(np.std(y))}


def plot_regression(y: np.ndarray, pred: np.ndarray, label: str, path_scatter: Path, path_residuals: Path) -> None:
    """Predicted against true (a perfect model lies on the diagonal), and residuals against predicted."""
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y, pred, s=12, alpha=0.6)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel=f"true {label}", ylabel=f"predicted {label}", title="Predicted vs true (test)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_scatter, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(pred, y - pred, s=12, alpha=0.6)
    ax.axhline(0, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel=f"predicted {label}", ylabel="true - predicted", title="Residuals (test)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_residuals, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], class_names: list[str], path: Path) -> None:
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(m, cmap="Blues")
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted", ylabel="true",
           title="Confusion matrix (test)")
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, m[i, j], ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list[dict], path_loss: Path, path_acc: Path, score: str = "val_accuracy") -> None:
    epochs = [h["epoch"] for h in history]
    title = {"val_accuracy": "Validation accuracy", "val_r2": "Validation R²"}[score]
    for path, keys, title in ((path_loss, ("train_loss", "val_loss"), "Loss"), (path_acc, (score,), title)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _wrong_table(title: str, rows: list[dict]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    return [f"### {title}", "", "| text | true | predicted | probability |", "|---|---|---|---|",
            *[f"| {cell(r['text'])} | {r['true']} | {r['predicted']} | {r['probability']:.3f} |" for r in rows], ""]


def model_summary(model: dict) -> dict:
    """The model config fields that apply to this kind of model."""
    mlp_only, transformer_only = {"hidden_sizes"}, {"d_model", "n_layers", "n_heads", "d_ff", "max_len",
                                                   "vocab_size", "pooling", "use_sdpa"}
    drop = transformer_only if model.get("name") == "mlp" else mlp_only
    return {k: v for k, v in model.items() if k not in drop}


def _table_section(pre, missing_test: dict[str, int] | None) -> list[str]:
    """What a table model did to each column: role, fitted statistics, and how many values it imputed."""
    lines = ["## Columns (fitted on the training split)", "",
             f"{pre.rows} training rows. Missing values are imputed: numeric columns with the training mean, "
             f"categorical ones with the most frequent training value.", "",
             "| column | role | fitted | imputed (train) | imputed (test) |", "|---|---|---|---|---|"]
    for c in pre.columns:
        if c["role"] == "numeric":
            fitted = f"mean {c['mean']:.4g}, std {c['std']:.4g}, range {c['min']:.4g}..{c['max']:.4g}"
        else:
            fitted = f"{len(c['categories'])} categories + unknown (fill '{c['fill']}')" + (
                f", {c['other_values']} rarer values -> unknown" if c["other_values"] else "")
        test = (missing_test or {}).get(c["name"], "-")
        lines.append(f"| {c['name']} | {c['role']} | {fitted} | {c['missing']} | {test} |")
    total = sum(c["missing"] for c in pre.columns)
    lines += ["", f"Imputed values: {total} in the training split"
              + (f", {sum(missing_test.values())} in the test split." if missing_test is not None else "."), ""]
    return lines


def write_report(out: Path, run_name: str, ckpt: Path, metrics: dict, history: list[dict], config: dict,
                 preprocessor=None) -> Path:
    speed = "tokens_per_s" if history and "tokens_per_s" in history[0] else "samples_per_s"
    regression = config["model"].get("task") == "regression"
    if regression:
        headline = (f"- **test R²: {metrics['test_r2']:.4f}**, MAE {metrics['test_mae']:.4g}, RMSE "
                    f"{metrics['test_rmse']:.4g} on {metrics['test_samples']} held-out samples (label "
                    f"'{config['data']['label_column']}': mean {metrics['label_mean']:.4g}, std "
                    f"{metrics['label_std']:.4g})")
        score, images = ("val_r2", "val R²"), ["![predicted vs true](pred_vs_true.png) "
                                              "![residuals](residuals.png) ![loss](loss_curve.png) "
                                              "![R²](r2_curve.png)", ""]
        details: list[str] = []
    else:
        headline = (f"- **test accuracy: {metrics['test_accuracy']:.4f}** on {metrics['test_samples']} held-out "
                    f"samples (test loss {metrics['test_loss']:.4f})")
        score, images = ("val_accuracy", "val accuracy"), [
            "![confusion matrix](confusion_matrix.png) ![loss](loss_curve.png) ![accuracy](accuracy_curve.png)", ""]
        details = ["| class | precision | recall | f1 | support |", "|---|---|---|---|---|",
                   *[f"| {n} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1-score']:.3f} | {int(c['support'])} |"
                     for n, c in metrics["per_class"].items()], ""]
    lines = [
        f"# {config['name']}: run `{run_name}`",
        "",
        f"- best checkpoint (by {config['evaluate']['metric']}): `{ckpt.name}`",
        headline,
        f"- model: {model_summary(config['model'])}",
        f"- training: {config['train']}",
        "",
        f"| epoch | train loss | val loss | {score[1]} | {speed.replace('_per_s', '/s')} |",
        "|---|---|---|---|---|",
        *[f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {h[score[0]]:.4f} | "
          f"{h[speed]:.0f} |" for h in history],
        "",
        *details,
        *images,
    ]
    if getattr(preprocessor, "kind", None) == "table":
        lines += _table_section(preprocessor, metrics.get("imputed_test"))
    if metrics.get("confidently_wrong"):
        lines += ["## Most confidently wrong", ""]
        for split, rows in metrics["confidently_wrong"].items():
            lines += _wrong_table(f"{split} split", rows)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    write_html(out / "report.html", "\n".join(lines), out, title=f"{config['name']}: {run_name}")
    return path


_HTML_STYLE = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em}"
               "img{max-width:32%;min-width:20em;vertical-align:top}code{background:#f4f4f4}")


def write_html(path: Path, markdown: str, images_dir: Path, title: str) -> None:
    """report.md as one self-contained HTML file: the plots are inlined (base64), so it can be mailed or
    attached to a ticket as it is."""
    import base64
    import html
    import re

    from markdown_it import MarkdownIt  # rich's own Markdown parser

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def inline(match: re.Match) -> str:
        image = images_dir / html.unescape(match.group(1))
        if not image.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"'

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    path.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                    f"<style>{_HTML_STYLE}</style></head><body>{body}</body></html>\n")


def evaluate_checkpoint(ckpt: Path, raw_test: ray.data.Dataset | dict, out: Path, run_name: str,
                        val_split: ray.data.Dataset | None = None) -> dict:
    """Everything the evaluate step leaves in ``out``; returns the test metrics. Text models also list
    their most confidently wrong sentences of the test split (and of ``val_split`` when given)."""
    out.mkdir(parents=True, exist_ok=True)
    loaded = checkpoint.load(ckpt)
    text = loaded.preprocessor.raw_column == "text"
    table = getattr(loaded.preprocessor, "kind", None) == "table"
    batch_size = loaded.config["evaluate"]["batch_size"]
    missing: dict[str, int] | None = {} if table else None
    y, probs, *inputs = predict_split(loaded, raw_test, batch_size, keep_inputs=text, missing=missing)
    regression = loaded.task == "regression"
    metrics = score_regression(y, probs[:, 0], loaded) if regression else score(y, probs, loaded.class_names)
    if table:
        metrics["imputed_test"] = missing
        metrics["imputed_train"] = {c["name"]: c["missing"] for c in loaded.preprocessor.columns}
    if text:
        metrics["confidently_wrong"] = {"test": confidently_wrong(inputs[0], y, probs, loaded.class_names)}
        if val_split is not None:
            vy, vprobs, vtexts = predict_split(loaded, val_split, batch_size, keep_inputs=True)
            metrics["val_accuracy"] = float(accuracy_score(vy, vprobs.argmax(1)))
            metrics["confidently_wrong"]["validation"] = confidently_wrong(vtexts, vy, vprobs, loaded.class_names)
    history = loaded.metrics.get("history", [])
    # Curves cover every epoch of the run, also those after the best checkpoint.
    done = list_checkpoints(ckpt.parent)  # complete checkpoints only, by epoch
    if done:
        history = json.loads((done[-1][1] / "metrics.json").read_text()).get("history", history)
    (out / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    if regression:
        plot_regression(y, probs[:, 0], loaded.preprocessor.label_column, out / "pred_vs_true.png",
                        out / "residuals.png")
        plot_curves(history, out / "loss_curve.png", out / "r2_curve.png", score="val_r2")
    else:
        plot_confusion(metrics["confusion_matrix"], loaded.class_names, out / "confusion_matrix.png")
        plot_curves(history, out / "loss_curve.png", out / "accuracy_curve.png")
    write_report(out, run_name, ckpt, metrics, history, loaded.config, loaded.preprocessor)
    return metrics
