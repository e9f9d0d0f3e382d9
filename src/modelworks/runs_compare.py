"""`modelworks runs compare RUN RUN...`: what differs between runs, their metrics and their learning curves.

``compare_runs`` reads the runs' manifests (``runs.py``) into the config fields that differ (dotted keys such
as ``train.lr``), the final metrics side by side, and each history metric's curve per run;
``plot_comparison`` draws the curves overlaid, one panel per metric (matplotlib, imported only here).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from modelworks.errors import UserError
from modelworks.runs import find_run, read_manifest, runs_root

# History fields that are not learning curves: the x axis, throughput, the learning-rate schedule.
NOT_CURVES = {"epoch", "step", "lr", "train_samples", "samples_per_s", "tokens_per_s", "seconds"}
_MISSING = object()


def flatten(config: Any, prefix: str = "") -> dict:
    """``{"train": {"lr": 0.003}}`` -> ``{"train.lr": 0.003}``; lists and empty dicts stay values."""
    if not isinstance(config, dict) or (not config and prefix):
        return {prefix: config}
    out = {}
    for k, v in config.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def history_of(manifest: dict) -> list[dict]:
    """The learning curve: the last step whose output value has a non-empty ``history`` (train or search)."""
    found = []
    for s in manifest.get("steps") or []:
        value = (s.get("outputs") or {}).get("value")
        if isinstance(value, dict) and isinstance(value.get("history"), list) and value["history"]:
            found = [h for h in value["history"] if isinstance(h, dict)]
    return found


def compare_runs(names: list[str], root: Path | str | None = None) -> dict:
    """``runs compare``'s data: differing config fields (missing = None), metrics per run, curves per metric."""
    names = list(dict.fromkeys(names))
    if len(names) < 2:
        raise UserError("compare needs at least two runs, e.g. `modelworks runs compare RUN1 RUN2`; "
                        "`modelworks runs list` shows the runs")
    dirs = [find_run(n, root) for n in names]
    runs, manifests = [d.name for d in dirs], [read_manifest(d) for d in dirs]
    flat = [flatten(m.get("config") or {}) for m in manifests]
    keys = sorted(set().union(*flat))
    differ = {k: [f.get(k, _MISSING) for f in flat] for k in keys}
    differ = {k: [None if v is _MISSING else v for v in vs] for k, vs in differ.items()
              if any(v is _MISSING or v != vs[0] for v in vs)}
    metric_keys = list(dict.fromkeys(k for m in manifests for k in (m.get("metrics") or {})))
    metrics = {k: [(m.get("metrics") or {}).get(k) for m in manifests] for k in metric_keys}
    curves, x_keys = {}, set()
    for run, m in zip(runs, manifests):
        hist = history_of(m)
        x = "step" if any("step" in h for h in hist) else "epoch"
        if hist:
            x_keys.add(x)
        for h in hist:
            for k, v in h.items():
                if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool) and x in h:
                    curves.setdefault(k, {}).setdefault(run, []).append([h[x], v])
    order = sorted(curves, key=lambda k: (k != "val_loss", not k.startswith("val_"), k))
    return {"runs": runs, "config_differs": differ, "config_equal": len(keys) - len(differ),
            "metrics": metrics, "curves": {k: curves[k] for k in order},
            "x": " / ".join(sorted(x_keys)) or "epoch"}


def default_plot_path(runs: list[str], root: Path | str | None = None) -> Path:
    """``compare-<run1>-<run2>.png`` in the runs folder; a shared prefix (``digits-``) is written once, and
    past three runs the rest are counted."""
    prefix = os.path.commonprefix(runs)
    prefix = prefix[: prefix.rfind("-") + 1] if "-" in prefix else ""
    parts = [r[len(prefix):] for r in runs]
    parts = parts[:3] + ([f"and-{len(parts) - 3}-more"] if len(parts) > 3 else [])
    return (Path(root) if root else runs_root()) / f"compare-{prefix}{'-'.join(parts)}.png"


def plot_comparison(comparison: dict, out: Path) -> Path | None:
    """One panel per curve metric, one line per run (the same colour in every panel). None: no curves."""
    curves = comparison["curves"]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(len(curves), 3)
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (metric, per_run) in zip(axes.flat, curves.items()):
        for i, run in enumerate(comparison["runs"]):
            if run in per_run:
                xs, ys = zip(*per_run[run])
                ax.plot(xs, ys, color=f"C{i % 10}", marker="o" if len(xs) <= 30 else None, ms=3, label=run)
        ax.set(title=metric, xlabel=comparison["x"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
