"""`modelworks runs list|show|compare` on manifests written here in the runner's format (no Ray): newest first,
cache hits per step, exactly the config fields that differ, metrics side by side, a learning-curve PNG, plain
text (no control codes) when stdout is not a terminal, one-line errors for unknown runs."""
from __future__ import annotations

import copy
import json
import re

import pytest

from modelworks import runs, runs_compare
from modelworks.cli import main

ANSI = re.compile(r"\x1b\[")
CONFIG = {"name": "digits", "data": {"source": "digits", "val_fraction": 0.1},
          "model": {"kind": "mlp", "hidden": [64, 32]},
          "train": {"lr": 0.003, "epochs": 3, "batch_size": 64, "workers": 1},
          "evaluate": {"min_accuracy": 0.8}, "registry": {"enabled": True}, "search": {"enabled": False}}


def manifest(run: str, started: str, lr: float, epochs: int, acc: list[float], cache: str = "miss") -> dict:
    config = copy.deepcopy(CONFIG)
    config["train"].update(lr=lr, epochs=epochs)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_accuracy": a, "lr": lr,
                "samples_per_s": 20000.0} for e, a in enumerate(acc, start=1)]
    metrics = {"val_accuracy": acc[-1], "test_accuracy": acc[-1] - 0.01}
    step = {"status": "succeeded", "cache": cache, "key": "9f0e1d2c3b4a", "started": started, "finished": started,
            "seconds": 0.4, "resources": {"cpus": 1, "gpus": 0, "memory_mb": None}, "error": None}
    return {
        "format": 1, "run": run, "workflow": "digits", "config": config, "config_digest": run[-8:] * 4,
        "code": {"source_hash": "5ce0ffee" * 8, "git_commit": "abc1234def5678", "package_version": "0.1.0"},
        "status": "succeeded", "started": started, "finished": started, "seconds": 12.3,
        "steps": [
            {**step, "name": "ingest", "cache": "hit",
             "inputs": {"config": {"data": config["data"]}, "upstream": {},
                        "data": [{"path": "/data/digits/digits.csv.gz", "size": 9912422, "sha256": "ab" * 32}]},
             "outputs": {"files": ["data"], "value": {"rows": 1797}}},
            {**step, "name": "train", "seconds": 6.2,
             "outputs": {"files": [f"checkpoint_epoch={epochs}"],
                         "value": {"checkpoint": f"/runs/{run}/train/checkpoint_epoch={epochs}",
                                   "metrics": {"val_accuracy": acc[-1], "val_loss": 1.1 / epochs},
                                   "history": history}}},
            {**step, "name": "evaluate", "outputs": {"files": ["evaluation"], "value": {
                "metrics": {"test_accuracy": acc[-1] - 0.01, "test_samples": 360},
                "report": f"/runs/{run}/evaluate/evaluation/report.md"}}},
            {**step, "name": "register", "outputs": {"files": [], "value": {"model": "digits@3", "production": True}}},
        ],
        "metrics": metrics, "model": "digits@3",
    }


@pytest.fixture
def three_runs(modelworks_home):
    root = runs.runs_root()
    written = {
        "digits-aaaa1111": manifest("digits-aaaa1111", "2026-11-29T17:40:00+00:00", 0.003, 3, [0.8, 0.9, 0.95]),
        "digits-bbbb2222": manifest("digits-bbbb2222", "2026-11-29T18:00:00+00:00", 0.01, 3, [0.7, 0.85, 0.93],
                                    cache="hit"),
        "digits-cccc3333": manifest("digits-cccc3333", "2026-11-29T17:50:00+00:00", 0.003, 5,
                                    [0.8, 0.9, 0.95, 0.96, 0.97]),
    }
    for name, m in written.items():
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text(json.dumps(m))
    (root / "digits-old00000" / "logs").mkdir(parents=True)  # an older run: no manifest, skipped
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["runs", *argv])
    out, err = capsys.readouterr()
    assert not ANSI.search(out + err), "control codes in captured output"
    return code, out, err


def test_runs_root_is_the_runners():
    from modelworks.registry import home

    assert runs.runs_root() == home() / "runs"  # runtime.runs_root() is home() / "runs" (but imports Ray)


def test_list_newest_first(three_runs, capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("digits-")]
    assert [ln.split()[0] for ln in lines] == ["digits-bbbb2222", "digits-cccc3333", "digits-aaaa1111"]
    assert "digits-old00000" not in out
    assert "test_accuracy 0.9600" in lines[1] and "digits@3" in lines[1] and "succeeded" in lines[1]
    code, out, _ = run_cli(capsys, "list", "--json")
    rows = json.loads(out)
    assert [r["run"] for r in rows] == ["digits-bbbb2222", "digits-cccc3333", "digits-aaaa1111"]
    assert rows[0]["metrics"]["val_accuracy"] == 0.93 and rows[0]["seconds"] == 12.3
    assert runs.list_runs(three_runs) == rows


def test_list_without_runs(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "no runs" in out
    assert runs.list_runs() == []


def test_show_steps_cache_metrics_data(three_runs, capsys):
    code, out, _ = run_cli(capsys, "show", "digits-aaaa1111")
    assert code == 0
    assert "workflow digits" in out and "aaaa1111" * 4 in out and "0.1.0 · git abc1234def" in out
    steps_table = out.split("\nsteps")[1].split("\nmetrics")[0]
    step_lines = {ln.split()[0]: ln.split() for ln in [ln for ln in steps_table.splitlines() if ln.strip()][2:]}
    assert list(step_lines) == ["ingest", "train", "evaluate", "register"]
    assert step_lines["ingest"][1:3] == ["succeeded", "hit"]
    assert step_lines["train"][1:4] == ["succeeded", "miss", "6.2"]
    assert "checkpoint_epoch=3" in step_lines["train"] and "digits@3" in step_lines["register"]
    assert "[production]" in out  # not eaten as rich markup
    assert "/data/digits/digits.csv.gz" in out and "9.9 MB" in out and "abababababab" in out
    assert "ab" * 32 not in out  # short sha256 only
    code, out, _ = run_cli(capsys, "show", "digits-aaaa", "--json")  # an unambiguous start of a name
    d = json.loads(out)
    assert d["run"] == "digits-aaaa1111" and [s["cache"] for s in d["steps"]] == ["hit", "miss", "miss", "miss"]
    assert d["data"][0]["sha256"] == "ab" * 32 and d["report"].endswith("report.md")


def test_compare_differences_metrics_and_plot(three_runs, capsys):
    from PIL import Image

    code, out, _ = run_cli(capsys, "compare", "digits-aaaa1111", "digits-bbbb2222", "digits-cccc3333")
    assert code == 0
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.split()}
    assert rows["train.lr"] == ["0.003", "0.01", "0.003"]
    assert rows["train.epochs"] == ["3", "3", "5"]
    assert not any(k.startswith(("train.batch_size", "data.", "model.", "name")) for k in rows)
    n_fields = len(runs_compare.flatten(CONFIG))
    assert f"2 field(s) differ, {n_fields - 2} equal in all 3 runs" in out
    assert rows["val_accuracy"] == ["0.9500", "0.9300", "0.9700"]
    assert rows["test_accuracy"] == ["0.9400", "0.9200", "0.9600"]
    png = three_runs / "compare-digits-aaaa1111-bbbb2222-cccc3333.png"
    assert f"learning curves: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert 800 <= im.size[0] <= 2000 and 250 <= im.size[1] <= 1200  # 3 panels in a row


def test_compare_data_and_out(three_runs, tmp_path, capsys):
    c = runs_compare.compare_runs(["digits-aaaa1111", "digits-cccc3333"], three_runs)
    assert c["config_differs"] == {"train.epochs": [3, 5]} and c["x"] == "epoch"
    assert list(c["curves"]) == ["val_loss", "val_accuracy", "train_loss"]  # not lr / samples_per_s
    assert c["curves"]["val_accuracy"]["digits-cccc3333"][-1] == [5, 0.97]
    out_png = tmp_path / "plots" / "cmp.png"
    code, out, _ = run_cli(capsys, "compare", "digits-aaaa1111", "digits-cccc3333", "--out", str(out_png), "--json")
    data = json.loads(out)
    assert code == 0 and data["plot"] == str(out_png) and out_png.stat().st_size > 1000
    assert data["config_differs"] == {"train.epochs": [3, 5]}


def test_compare_language_model_steps_and_missing_fields(three_runs):
    lm = manifest("shakespeare-dddd4444", "2026-11-30T09:00:00+00:00", 0.001, 2, [0.3, 0.4])
    lm["config"]["train"]["context"] = 128
    hist = [{"epoch": 1, "step": 200, "train_loss": 2.1, "val_loss": 2.0, "val_perplexity": 7.4},
            {"epoch": 2, "step": 400, "train_loss": 1.8, "val_loss": 1.7, "val_perplexity": 5.5}]
    lm["steps"][1]["outputs"]["value"]["history"] = hist
    (three_runs / "shakespeare-dddd4444").mkdir()
    (three_runs / "shakespeare-dddd4444" / "manifest.json").write_text(json.dumps(lm))
    c = runs_compare.compare_runs(["shakespeare-dddd4444", "digits-aaaa1111"], three_runs)
    assert c["config_differs"]["train.context"] == [128, None]
    assert c["curves"]["val_perplexity"] == {"shakespeare-dddd4444": [[200, 7.4], [400, 5.5]]}
    assert c["x"] == "epoch / step"
    png = runs_compare.default_plot_path(c["runs"], three_runs)
    assert png.name == "compare-shakespeare-dddd4444-digits-aaaa1111.png"


def test_default_plot_path_shortens():
    names = [f"digits-{i}{i}{i}" for i in range(5)]
    assert runs_compare.default_plot_path(names, "/r").name == "compare-digits-000-111-222-and-2-more.png"


@pytest.mark.parametrize("argv, message", [
    (["show", "nope"], "no run 'nope'"),
    (["compare", "digits-aaaa1111", "nope"], "no run 'nope'"),
    (["compare", "digits-aaaa1111"], "at least two runs"),
    (["show", "digits-old00000"], "has no manifest.json"),
    (["show", "digits-"], "ambiguous"),
])
def test_unknown_run_is_one_line(three_runs, capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    if "nope" in argv:
        assert "modelworks runs list" in err


def test_sparse_manifest_and_failed_step(three_runs, capsys):
    """Optional keys missing (a run still going, a step that failed): shown with '-' rather than an error."""
    sparse = {"format": 1, "run": "custom-eeee5555", "status": "failed", "started": "2026-12-01T08:00:00+00:00",
              "steps": [{"name": "my_step", "status": "failed", "error": "DataError: no file x.csv\n  trace..."}]}
    (three_runs / "custom-eeee5555").mkdir()
    (three_runs / "custom-eeee5555" / "manifest.json").write_text(json.dumps(sparse))
    code, out, _ = run_cli(capsys, "list")
    first = [ln for ln in out.splitlines() if ln.startswith(("digits-", "custom-"))][0].split()
    assert code == 0 and first[:3] == ["custom-eeee5555", "-", "failed"]
    code, out, _ = run_cli(capsys, "show", "custom-eeee5555")
    assert code == 0 and "error: DataError: no file x.csv" in out and "trace" not in out
    assert "(not registered)" in out
