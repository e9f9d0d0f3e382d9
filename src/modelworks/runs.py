"""`modelworks runs list|show|compare`: what past workflow runs did, read from their manifests.

Every workflow run writes ``$MODELWORKS_HOME/runs/<run>/manifest.json``: the full config, the code version,
each step's status, cache hit/miss, inputs and outputs, the final metrics and the registered model.

    modelworks runs list [--json]
        one row per run, newest first: run, workflow, status, started, seconds, key metrics, model
    modelworks runs show RUN [--json]
        the header (workflow, status, config digest, code version, times), a table of the steps (status,
        cache hit/miss, seconds, what each produced), the final metrics, the model, and the data files the
        run fingerprinted (path, size, short sha256)
    modelworks runs compare RUN RUN... [--out PNG] [--json]
        the config fields that differ between the runs (dotted keys such as ``train.lr``; fields equal in all
        runs are only counted), the final metrics side by side, and a PNG of the learning curves overlaid
        (one panel per history metric, x = epoch or step, one line per run); prints the PNG's path

RUN is a run folder's name, or an unambiguous start of one. Run folders without a manifest (runs from before
manifests existed) are skipped. Tables are plain text, no control codes, when stdout is not a terminal.
Imports neither Ray nor torch, so the commands start fast. ``compare``'s data and plot (matplotlib) are in
runs_compare.py; this module reads the manifests, prints the tables and adds the commands.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from modelworks.errors import UserError

MANIFEST = "manifest.json"
# The metrics a one-line summary shows, in this order of preference (at most two).
KEY_METRICS = ("test_accuracy", "val_accuracy", "test_r2", "val_r2", "test_mae", "val_loss", "val_perplexity")


def runs_root() -> Path:
    """Same folder as ``modelworks.runtime.runs_root()`` (``registry.home() / "runs"``), without importing
    Ray or torch (which those modules do)."""
    return Path(os.environ.get("MODELWORKS_HOME") or Path.home() / ".modelworks") / "runs"


# -- reading -----------------------------------------------------------------------------------------------
def read_manifest(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / MANIFEST).read_text())
    except ValueError as exc:
        raise UserError(f"{run_dir / MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{run_dir / MANIFEST} is not a JSON object")
    return data


def _timestamp(iso: str | None, fallback: float = 0.0) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else fallback
    except (TypeError, ValueError):
        return fallback


def list_runs(root: Path | str | None = None) -> list[dict]:
    """One dict per run folder with a manifest, newest first (by ``started``, else the manifest's mtime)."""
    root = Path(root) if root else runs_root()
    rows = []
    run_dirs = [p for p in root.iterdir() if (p / MANIFEST).is_file()] if root.is_dir() else []
    for run_dir in run_dirs:
        try:
            m = read_manifest(run_dir)
        except UserError:  # e.g. a run writing it right now: listed, not fatal
            m = {"status": "unreadable manifest"}
        rows.append({"run": run_dir.name, "workflow": m.get("workflow"), "status": m.get("status"),
                     "started": m.get("started"), "finished": m.get("finished"), "seconds": m.get("seconds"),
                     "metrics": m.get("metrics") or {}, "model": m.get("model"), "path": str(run_dir),
                     "_t": _timestamp(m.get("started"), (run_dir / MANIFEST).stat().st_mtime)})
    rows.sort(key=lambda r: (r["_t"], r["run"]), reverse=True)
    return [{k: v for k, v in r.items() if k != "_t"} for r in rows]


def find_run(name: str, root: Path | str | None = None) -> Path:
    """The run folder NAME (or the one folder whose name starts with NAME); a UserError if there is none."""
    root = Path(root) if root else runs_root()
    hint = "`modelworks runs list` shows the runs"
    if name and (root / name / MANIFEST).is_file():
        return root / name
    if name and (root / name).is_dir():
        raise UserError(f"run '{name}' has no {MANIFEST} (it ran before runs kept one); {hint}")
    starts = sorted(p.name for p in root.iterdir() if p.name.startswith(name) and (p / MANIFEST).is_file()) \
        if name and root.is_dir() else []
    if len(starts) == 1:
        return root / starts[0]
    if starts:
        raise UserError(f"run '{name}' is ambiguous: {', '.join(starts[:5])}{' ...' if len(starts) > 5 else ''}")
    raise UserError(f"no run '{name}' in {root}; {hint}")


def key_metrics(metrics: dict, n: int = 2) -> dict:
    """The one or two metrics that say how a run did (test accuracy, R², validation loss, ...)."""
    numeric = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in KEY_METRICS if k in numeric] or [k for k in numeric if not k.endswith("_samples")]
    return {k: numeric[k] for k in keys[:n]}


def summarize_outputs(step: dict) -> str:
    """What a step produced, in a few words: checkpoint, key metrics, model, else its files (or its error)."""
    if step.get("error"):
        err = step["error"]
        text = f"{err.get('type', 'error')}: {err.get('message', '')}" if isinstance(err, dict) else str(err)
        return "error: " + (text.strip().splitlines() or [""])[0][:120]
    outputs = step.get("outputs") or {}
    value, parts = outputs.get("value"), []
    if isinstance(value, dict):
        if value.get("checkpoint"):
            parts.append(Path(str(value["checkpoint"])).name)
        if isinstance(value.get("metrics"), dict):
            parts += [f"{k} {_num(v)}" for k, v in key_metrics(value["metrics"]).items()]
        if value.get("model"):
            parts.append(f"model {value['model']}{' [production]' if value.get('production') else ''}")
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        parts.append(str(value)[:60])
    if not parts:
        files = [str(f) for f in outputs.get("files") or []]
        parts.append(", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else ""))
    return "  ".join(p for p in parts if p)


def describe_run(name: str, root: Path | str | None = None) -> dict:
    """``runs show``'s data: the header, one summary per step, final metrics, model, fingerprinted data files."""
    run_dir = find_run(name, root)
    m = read_manifest(run_dir)
    steps, data, seen, report = [], [], set(), None
    for s in m.get("steps") or []:
        steps.append({"name": s.get("name"), "status": s.get("status"), "cache": s.get("cache"),
                      "seconds": s.get("seconds"), "key": s.get("key"), "outputs": summarize_outputs(s)})
        for d in (s.get("inputs") or {}).get("data") or []:
            d = d if isinstance(d, dict) else {"path": str(d)}
            if d.get("path") not in seen:
                seen.add(d.get("path"))
                data.append({"step": s.get("name"), "path": d.get("path"), "size": d.get("size"),
                             "sha256": d.get("sha256")})
        value = (s.get("outputs") or {}).get("value")
        report = value["report"] if isinstance(value, dict) and value.get("report") else report
    return {"run": run_dir.name, "workflow": m.get("workflow"), "status": m.get("status"),
            "config_digest": m.get("config_digest"), "code": m.get("code") or {}, "started": m.get("started"),
            "finished": m.get("finished"), "seconds": m.get("seconds"), "steps": steps,
            "metrics": m.get("metrics") or {}, "model": m.get("model"), "report": report, "data": data,
            "path": str(run_dir)}


# -- printing ----------------------------------------------------------------------------------------------
def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.3g}" if 0 < abs(v) < 0.001 else f"{v:.4f}"


def _value(v: Any) -> str:
    return "-" if v is None else v if isinstance(v, str) else json.dumps(v)


def _when(iso: str | None, form: str = "%Y-%m-%d %H:%M:%S") -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime(form)
    except (TypeError, ValueError):
        return iso or "-"


def _seconds(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else "-"


def _size(n: Any) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if isinstance(n, int) and n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B" if isinstance(n, int) else "-"


def _console():
    from rich.console import Console

    tty = sys.stdout.isatty()  # not a terminal: plain text, and no wrapping at 80 columns
    return Console(file=sys.stdout, force_terminal=tty, no_color=not tty, width=None if tty else 1000,
                   highlight=False, markup=False, emoji=False)


def _table(console, columns: list[str], rows: list[list], right: tuple[int, ...] = (), styles=None,
           wrap: int = -1) -> None:
    """A table with a rule under its header. ``right``: the numeric columns; ``styles``: cell text -> style;
    ``wrap``: the one column that wraps on a narrow terminal (the others keep their width)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    wrap %= len(columns)
    for i, c in enumerate(columns):
        width = None if i == wrap else max(len(str(r[i])) for r in [columns, *rows])
        table.add_column(c, justify="right" if i in right else "left", no_wrap=i != wrap, min_width=width)
    for row in rows:
        table.add_row(*(Text(str(c), style=(styles or {}).get(str(c), "")) for c in row))
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as captured:  # plain text: without the padding after each row's last cell
        console.print(table)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


STATUS_STYLE = {"succeeded": "green", "failed": "bold red", "running": "yellow", "hit": "cyan"}


def print_list(rows: list[dict], root: Path) -> None:
    console = _console()
    if not rows:
        console.print(f"no runs with a {MANIFEST} in {root}")
        return
    _table(console, ["run", "workflow", "status", "started", "seconds", "metrics", "model"],
           [[r["run"], r["workflow"] or "-", r["status"] or "-", _when(r["started"], "%Y-%m-%d %H:%M"),
             _seconds(r["seconds"]),
             "  ".join(f"{k} {_num(v)}" for k, v in key_metrics(r["metrics"]).items()) or "-", r["model"] or "-"]
            for r in rows], right=(4,), styles=STATUS_STYLE, wrap=5)


def print_run(d: dict) -> None:
    console = _console()
    code = d["code"]
    version = " · ".join(p for p in (code.get("package_version"),
                                     code.get("git_commit") and f"git {code['git_commit'][:10]}",
                                     code.get("source_hash") and f"source {code['source_hash'][:10]}") if p)
    console.print(f"run {d['run']} · workflow {d['workflow'] or '-'} · {d['status'] or '-'}", style="bold")
    for key, value in (("started", f"{_when(d['started'])}  finished {_when(d['finished'])}  "
                                   f"({_seconds(d['seconds'])} s)"),
                       ("config digest", d["config_digest"] or "-"), ("code", version or "-"),
                       ("folder", d["path"])):
        console.print(f"{key + ':':<16}{value}")
    console.print("\nsteps", style="bold")
    _table(console, ["step", "status", "cache", "seconds", "outputs"],
           [[s["name"], s["status"] or "-", s["cache"] or "-", _seconds(s["seconds"]), s["outputs"]]
            for s in d["steps"]], right=(3,), styles=STATUS_STYLE)
    if d["metrics"]:
        console.print("\nmetrics", style="bold")
        _table(console, ["metric", "value"], [[k, _num(v)] for k, v in d["metrics"].items()], right=(1,))
    console.print(f"\n{'model:':<16}{d['model'] or '(not registered)'}")
    if d["report"]:
        console.print(f"{'report:':<16}{d['report']}")
    if d["data"]:
        console.print("\ndata files", style="bold")
        _table(console, ["step", "path", "size", "sha256"],
               [[f["step"], f["path"], _size(f["size"]), (f["sha256"] or "-")[:12]] for f in d["data"]],
               right=(2,), wrap=1)


def print_comparison(c: dict, plot: Path | None) -> None:
    console = _console()
    differ, runs = c["config_differs"], c["runs"]
    console.print(f"config: {len(differ)} field(s) differ, {c['config_equal']} equal in all {len(runs)} runs",
                  style="bold")
    if differ:
        _table(console, ["field", *runs], [[k, *map(_value, vs)] for k, vs in differ.items()])
    console.print("\nmetrics", style="bold")
    if c["metrics"]:
        _table(console, ["metric", *runs], [[k, *map(_num, vs)] for k, vs in c["metrics"].items()],
               right=tuple(range(1, len(runs) + 1)))
    else:
        console.print("(no run recorded final metrics)")
    console.print(f"\nlearning curves: {plot}" if plot else "\nlearning curves: none (no step recorded a history)")


# -- the command line --------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    rows = list_runs()
    if args.json:
        print(json.dumps(rows))
    else:
        print_list(rows, runs_root())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    d = describe_run(args.run)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print_run(d)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    # Imported here: runs_compare imports this module (and only `compare` needs it).
    from modelworks.runs_compare import compare_runs, default_plot_path, plot_comparison

    c = compare_runs(args.runs)
    plot = plot_comparison(c, Path(args.out) if args.out else default_plot_path(c["runs"]))
    if args.json:
        print(json.dumps({**c, "plot": str(plot) if plot else None}))
    else:
        print_comparison(c, plot)
    return 0


def add_commands(subparsers) -> None:
    runs = subparsers.add_parser("runs", help="past workflow runs: list them, show one, compare several",
                                 description="Past workflow runs, read from runs/<run>/manifest.json.")
    sub = runs.add_subparsers(dest="runs_cmd", required=True)
    ls = sub.add_parser("list", help="all runs, newest first")
    ls.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    ls.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="one run: steps, cache hits, metrics, model, data files")
    show.add_argument("run", help="run name (or the start of one)")
    show.add_argument("--json", action="store_true", help="JSON instead of tables")
    show.set_defaults(func=cmd_show)
    cmp = sub.add_parser("compare", help="config differences, metrics and learning curves of 2+ runs")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="two or more run names")
    cmp.add_argument("--out", help="learning-curve PNG (default: <runs folder>/compare-<runs>.png)")
    cmp.add_argument("--json", action="store_true", help="JSON instead of tables (the PNG is still written)")
    cmp.set_defaults(func=cmd_compare)
