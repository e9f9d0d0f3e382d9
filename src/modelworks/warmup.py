"""Load the libraries a run's later steps need in a background thread, while the run mostly waits.

A run's driver spends seconds waiting: on Ray's start, and on the trainer (its controller and worker processes
start, import PyTorch and train). Meanwhile one of two cores is idle. The libraries that the ingest and evaluate
steps import on first use cost seconds of their own on 2 cores: scikit-learn ~1.3 s (its tables and its
metrics), matplotlib ~1 s, and its first figure ~0.2 s more (fonts). Importing them here, in the waits, takes
those seconds off the whole run; a step that needs a module before the thread is done waits on Python's import
lock for the one import in progress, never imports it twice. Nothing here changes what a step does: a failed
import is left for the step to raise with its own message.
"""
from __future__ import annotations

import importlib
import io
import os
import sys
import threading

from modelworks.config import WorkflowConfig


def ingest_modules(cfg: WorkflowConfig) -> list[str]:
    """What the ingest step imports: loaded while Ray starts."""
    return ["sklearn.datasets"] if cfg.data.source == "sklearn" else []  # its loaders read the tables it ships


def evaluate_modules(cfg: WorkflowConfig) -> list[str]:
    """What the evaluate step imports: loaded while the trainer runs (not earlier: on 2 cores the import would
    take the GIL and a core from the ingest step's own work)."""
    return ["modelworks.evaluate_lm" if cfg.model.task == "language_model" else "modelworks.evaluate"]


def _draw_text() -> None:
    """One tiny figure with text, drawn off-screen without pyplot (its figure list is not thread-safe): loads
    the font and the Agg renderer that the report's first plot would otherwise load."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, "0")
    fig.savefig(io.BytesIO(), format="png")


def yield_cpu() -> None:
    """Give the calling thread the lowest CPU priority (nice 19); for the driver's background threads (these
    imports, MLflow logging). On Linux the nice value belongs to the thread, not the process: the main thread
    keeps its own. Ray runs its worker processes at nice 15, so a background thread at the driver's nice 0 takes
    a core from Ray Train's start-up whenever both cores are busy; at 19 it mostly gets what they leave idle
    (digits joined, 4 alternating runs each: 14.9 s to the summary against 15.7 s). Elsewhere it does nothing."""
    if not sys.platform.startswith("linux"):  # elsewhere a thread id is no process id setpriority knows
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass


def _load(modules: list[str]) -> None:
    yield_cpu()
    try:
        for name in modules:
            importlib.import_module(name)
        if any(m.startswith("modelworks.evaluate") for m in modules):
            _draw_text()
    except Exception:  # noqa: BLE001 - the step that needs the module raises it, with its context
        pass


def start(modules: list[str]) -> threading.Thread:
    """Import ``modules`` in a daemon thread (it never keeps the process alive); returns the thread."""
    thread = threading.Thread(target=_load, args=(list(modules),), name="modelworks-warmup", daemon=True)
    thread.start()
    return thread
