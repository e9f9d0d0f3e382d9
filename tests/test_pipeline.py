"""The step graph (no Ray), the step cache and materialised data (real files), and the runner on a real local
Ray: a second unchanged run recomputes nothing, a changed train field reruns only what is downstream of it,
a changed data file reruns everything, user steps run as Ray tasks, runs compare."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from modelworks.config import apply_overrides, load_workflow, load_workflow_file
from modelworks.data.store import read_arrays, write_arrays
from modelworks.errors import UserError
from modelworks.pipeline import Graph, Step, step, user_steps
from modelworks.pipeline.cache import CacheStore, fingerprint

REPO = Path(__file__).resolve().parents[1]


def _fn(**kw):
    return kw


# ----------------------------------------------------------------------------------------------- graph
def test_graph_orders_steps_by_their_inputs_not_their_listing():
    g = Graph([Step("report", ("evaluate",), _fn), Step("evaluate", ("train",), _fn), Step("train", (), _fn),
               Step("plot", ("train",), _fn)])
    assert g.order == ["train", "evaluate", "report", "plot"]
    assert g.downstream("evaluate") == {"evaluate", "report"}
    assert g.downstream("train") == {"train", "evaluate", "report", "plot"}


def test_graph_refuses_cycles_unknown_inputs_and_duplicate_names():
    with pytest.raises(UserError, match="cycle"):
        Graph([Step("a", ("b",), _fn), Step("b", ("a",), _fn)])
    with pytest.raises(UserError, match="consumes 'evaluat'.*step names"):
        Graph([Step("evaluate", (), _fn), Step("note", ("evaluat",), _fn)])
    with pytest.raises(UserError, match="two steps are named 'a'"):
        Graph([Step("a", (), _fn), Step("a", (), _fn)])


def test_step_decorator_reads_inputs_from_parameters_and_keeps_resources():
    @step(cpus=2, memory_mb=256)
    def summary(evaluate, train, config, out_dir):
        """One line for --steps."""
        return {}

    s = summary.modelworks_step
    assert s.inputs == ("evaluate", "train") and s.resources.cpus == 2 and s.resources.memory_mb == 256
    assert s.about == "One line for --steps." and not s.builtin
    assert user_steps({"summary": summary, "x": 1}) == [s]


# ----------------------------------------------------------------------------------------------- cache
def test_cache_entry_is_whole_or_absent(tmp_path):
    run = tmp_path / "run"
    (run / "out").mkdir(parents=True)
    (run / "out" / "a.txt").write_text("a")
    store = CacheStore(tmp_path / "cache")
    # What a crash mid-publish leaves: a temporary folder, never read as an entry.
    (tmp_path / "cache" / "train" / ".k1.123.tmp").mkdir(parents=True)
    (tmp_path / "cache" / "train" / ".k1.123.tmp" / "entry.json").write_text("{}")
    assert store.lookup("train", "k1") is None
    entry = store.publish("train", "k1", run, ["out"], {"metric": 1.0})
    assert entry.value == {"metric": 1.0} and store.lookup("train", "k1").files == ["out"]
    # A second publisher of the same key (a concurrent run) keeps the first entry and drops its copy.
    again = store.publish("train", "k1", run, ["out"], {"metric": 2.0})
    assert again.value == {"metric": 1.0}
    assert [p.name for p in (tmp_path / "cache" / "train").iterdir() if p.name.endswith(".tmp")] == [".k1.123.tmp"]
    # Restoring links the files into another run; an entry missing a file is not reused.
    other = tmp_path / "other"
    entry.restore(other)
    assert (other / "out" / "a.txt").read_text() == "a"
    (entry.path / "files" / "out" / "a.txt").unlink()
    shutil.rmtree(entry.path / "files" / "out")
    assert store.lookup("train", "k1") is None


def test_fingerprint_changes_with_content_not_with_time(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("a,b\n1,2\n")
    first = fingerprint([str(f)])
    os.utime(f, (1, 1))
    assert fingerprint([str(f)]) == first
    f.write_text("a,b\n1,3\n")
    assert fingerprint([str(f)])[0]["sha256"] != first[0]["sha256"]


def test_arrays_round_trip_through_parquet(tmp_path):
    cols = {"x": np.random.default_rng(0).random((5, 2, 3), dtype=np.float32), "label": np.arange(5, dtype=np.int64)}
    write_arrays(tmp_path / "a.parquet", cols)
    back = read_arrays(tmp_path / "a.parquet")
    assert back["x"].shape == (5, 2, 3) and back["x"].dtype == np.float32 and np.array_equal(back["x"], cols["x"])
    assert np.array_equal(back["label"], cols["label"])


def test_steps_flag_prints_the_graph_without_starting_ray(tmp_path, capsys):
    from modelworks.cli import main

    assert main(["run", str(_user_workflow(tmp_path)), "--steps"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == ["ingest", "preprocess", "train", "evaluate", "register",
                                                 "test_errors", "verdict"]
    assert "Ray task (1 CPU)" in out[5] and "<- evaluate" in out[5] and "<- test_errors" in out[6]


# --------------------------------------------------------------------------------------- the runner
def _digits(*overrides):
    return apply_overrides(load_workflow(REPO / "workflows/digits.py"), ["train.epochs=2", *overrides])


def _cache(run_dir: str) -> dict:
    return {s["name"]: s["cache"] for s in json.loads((Path(run_dir) / "manifest.json").read_text())["steps"]}


@pytest.mark.ray
def test_unchanged_rerun_is_all_hits_and_a_train_field_reruns_only_downstream(ray_local, capsys):
    from modelworks.cli import main
    from modelworks.workflow import run_workflow

    first = run_workflow(_digits(), run_name="first", log=lambda m: None)
    assert set(_cache(first.run_dir).values()) == {"miss"}
    t0 = time.time()
    lines = []
    again = run_workflow(_digits(), run_name="again", log=lines.append)
    seconds = time.time() - t0
    print(f"\nan unchanged workflow, rerun under another name: {seconds:.2f} s, every step cached")
    assert _cache(again.run_dir) == dict.fromkeys(["ingest", "preprocess", "train", "evaluate", "register"], "hit")
    assert again.model == first.model and again.test_accuracy == first.test_accuracy
    assert any("cached (run first)" in line for line in lines)
    # The cached checkpoint is in the new run, as files, and loads.
    from modelworks import checkpoint

    assert checkpoint.load(again.checkpoint).spec["hidden_sizes"] == [128, 64]

    changed = run_workflow(_digits("train.lr=0.001"), run_name="changed", log=lambda m: None)
    assert _cache(changed.run_dir) == {"ingest": "hit", "preprocess": "hit", "train": "miss", "evaluate": "miss",
                                       "register": "miss"}
    assert changed.model != first.model

    # Two real runs compared: the one differing field, the metrics, the learning curves.
    out = Path(first.run_dir).parent / "cmp.png"
    capsys.readouterr()
    assert main(["runs", "compare", "first", "changed", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train.lr" in text and "0.003" in text and "0.001" in text and "train.epochs" not in text
    assert f"{changed.test_accuracy:.4f}" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
def test_a_changed_data_file_reruns_every_step(ray_local, tmp_path):
    from modelworks.data import idx
    from modelworks.workflow import run_workflow
    from tests.test_idx import make_split, write_idx

    folder = tmp_path / "tiny-mnist"  # MNIST's own file format, 300 + 100 images: the same ingest path
    train_images, _ = make_split(folder, 300, 300, split="train")
    make_split(folder, 100, 100, split="test")
    cfg = apply_overrides(load_workflow(REPO / "workflows/mnist.py"),
                          [f"data.path={folder}", "train.epochs=2", "registry.min_accuracy=0"])
    first = run_workflow(cfg, run_name="tiny-mnist", log=lambda m: None)
    assert set(_cache(first.run_dir).values()) == {"miss"}
    assert set(_cache(run_workflow(cfg, run_name="tiny-mnist", log=lambda m: None).run_dir).values()) == {"hit"}
    changed = folder / "raw" / f"{idx.FILES['train'][0]}.gz"
    train_images[0, 0, 0] ^= 1  # one pixel of one image
    write_idx(changed, train_images, compress=True)
    rerun = run_workflow(cfg, run_name="tiny-mnist", log=lambda m: None)
    assert set(_cache(rerun.run_dir).values()) == {"miss"}
    manifest = json.loads((Path(rerun.run_dir) / "manifest.json").read_text())
    ingest = manifest["steps"][0]
    assert str(changed) in [f["path"] for f in ingest["inputs"]["data"]] and len(manifest["attempts"]) == 2
    # The rerun trained afresh (its checkpoints were made for the old data): as many epochs as configured.
    history = manifest["steps"][2]["outputs"]["value"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def _user_workflow(tmp_path: Path) -> Path:
    path = tmp_path / "digits_with_steps.py"
    path.write_text('''
import os
from modelworks.config import TrainConfig, WorkflowConfig, DataConfig, RegisterConfig
from modelworks.pipeline import step

CONFIG = WorkflowConfig(name="digits", data=DataConfig(source="digits", name="digits", val_fraction=0.15,
                        test_fraction=0.2), train=TrainConfig(epochs=2, lr=3e-3), registry=RegisterConfig())


@step(cpus=1)
def test_errors(evaluate, out_dir):
    """Count the test mistakes."""
    import ray

    m = evaluate["metrics"]
    (out_dir / "note.txt").write_text("errors")
    return {"errors": round((1 - m["test_accuracy"]) * m["test_samples"]), "pid": os.getpid(),
             "cpus": ray.get_runtime_context().get_assigned_resources().get("CPU")}


@step(cpus=0.5)
def verdict(test_errors, config):
    return {"ok": test_errors["errors"] < 100, "workflow": config["name"], "pid": os.getpid()}
''')
    return path


@pytest.mark.ray
def test_user_steps_run_as_ray_tasks_and_feed_each_other(ray_local, tmp_path):
    from modelworks.workflow import execute, RunOptions

    cfg, namespace = load_workflow_file(_user_workflow(tmp_path))
    result, ctx = execute(cfg, run_name="user", data_dir=None, log=lambda m: None, user_steps=user_steps(namespace),
                          options=RunOptions())
    errors, verdict = ctx.value("test_errors"), ctx.value("verdict")
    assert errors["pid"] != os.getpid() and errors["cpus"] == 1.0  # a Ray task, with the CPU it asked for
    assert errors["errors"] == round((1 - result.test_accuracy) * 398)
    assert verdict == {"ok": errors["errors"] < 100, "workflow": "digits", "pid": verdict["pid"]}
    assert (Path(result.run_dir) / "steps" / "test_errors" / "note.txt").read_text() == "errors"
    steps = {s["name"]: s for s in json.loads((Path(result.run_dir) / "manifest.json").read_text())["steps"]}
    assert steps["test_errors"]["resources"]["cpus"] == 1 and steps["verdict"]["inputs"]["upstream"] == \
        {"test_errors": steps["test_errors"]["key"]}
    # Cached like the built-ins: a rerun does not run them again.
    _, again = execute(cfg, run_name="user2", data_dir=None, log=lambda m: None, user_steps=user_steps(namespace),
                       options=RunOptions())
    assert again.value("test_errors") == errors and _cache(again.run_dir)["verdict"] == "hit"


def test_a_user_step_returning_something_not_json_stops_with_one_line(tmp_path):
    from modelworks.pipeline.runner import _user_task

    with pytest.raises(UserError, match="step 'bad' returned ndarray, which is not JSON"):
        _user_task(lambda: np.zeros(2), {}, str(tmp_path / "o"), "bad")
