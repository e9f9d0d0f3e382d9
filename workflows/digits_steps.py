"""The digits workflow with two steps of the user's own, to show the step graph (`--steps` prints it).

Each `@step` function runs as a Ray task with the resources it asks for; its parameters name the steps it
consumes (their output values arrive as dicts), `out_dir` is a folder for its files, and what it returns is
its output value. Both are cached like the built-in steps: rerunning after changing `train.lr` reruns
train -> evaluate -> register -> weakest_classes -> gate_note, not ingest or preprocess.
"""
import json
from pathlib import Path

from modelworks.config import load_workflow
from modelworks.pipeline import step

# The same config as workflows/digits.py (so the two share their cached steps); only the user steps are new.
CONFIG = load_workflow(Path(__file__).with_name("digits.py"))


@step(cpus=1)
def weakest_classes(evaluate, out_dir):
    """The three digits with the lowest test recall, from the evaluate step's metrics file."""
    per_class = json.loads((Path(evaluate["report"]).parent / "test_metrics.json").read_text())["per_class"]
    ranked = sorted(per_class, key=lambda c: per_class[c]["recall"])[:3]
    lines = [f"digit {c}: recall {per_class[c]['recall']:.3f} ({int(per_class[c]['support'])} test images)"
             for c in ranked]
    (out_dir / "weakest.md").write_text("\n".join(lines) + "\n")
    return {"classes": ranked, "recall": [round(per_class[c]["recall"], 4) for c in ranked]}


@step(cpus=0.5)
def gate_note(weakest_classes, register):
    """One line for the release notes: the registered version and where it is weakest."""
    return {"note": f"{register['model']}: weakest on digits {', '.join(weakest_classes['classes'])}"}
