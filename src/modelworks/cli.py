"""`modelworks run|models ...` - the command line. User errors print one line and exit 2."""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import sys
import threading
import traceback

from modelworks.errors import UserError


def _find_user_error(exc: BaseException, depth: int = 0) -> UserError | None:
    """Ray wraps errors raised in tasks and workers; dig out the UserError so it prints as one line."""
    if isinstance(exc, UserError):
        return exc
    if depth > 8 or exc is None:
        return None
    inner = [getattr(exc, "cause", None), exc.__cause__, exc.__context__]
    failures = getattr(exc, "worker_failures", None) or {}
    inner += list(failures.values()) if isinstance(failures, dict) else []
    for e in inner:
        if isinstance(e, BaseException):
            found = _find_user_error(e, depth + 1)
            if found:
                return found
    # Last resort: Ray sometimes keeps only the text of the remote exception.
    for line in str(exc).splitlines():
        for kind in ("DataError: ", "CheckpointError: ", "UserError: "):
            if kind in line:
                return UserError(line.split(kind, 1)[1].strip())
    return None


def report_failure(exc: BaseException, log_path, err) -> int:
    """A failure once the process's output goes to a log file: one line on the terminal ``err`` (exit 2 for a
    user error, 1 otherwise); anything unexpected also leaves its traceback in the log."""
    found = _find_user_error(exc)
    if found is not None:
        print(f"error: {found} (log: {log_path})", file=err, flush=True)
        return 2
    traceback.print_exception(exc)  # into the log: stderr points there now
    first = (str(exc).strip().splitlines() or [""])[0]
    print(f"error: {type(exc).__name__}: {first}\nfull log: {log_path}", file=err, flush=True)
    return 1


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides `modelworks run`'s options give: its --set items, then --workers and --gpu."""
    overrides = list(args.set or [])
    if args.workers is not None:
        overrides.append(f"train.workers={args.workers}")
    if args.gpu:
        overrides.append("train.use_gpu=true")
    return overrides


def run_console(args: argparse.Namespace):
    """The console of `run` and `tune`, and its own copies of the terminal (out, err), which the summary and the
    JSON line go to: without --verbose, the process's stdout/stderr (Ray's output) go to runs/<run>/logs/ray.log
    once the run directory is known. With --json the console writes to stderr."""
    from modelworks.console import Console, terminal_copy

    out, err = terminal_copy(1), terminal_copy(2)
    console = Console(err if args.json else out, capture_to_run_logs=not args.verbose)
    if not args.verbose:
        os.environ.setdefault("MODELWORKS_PROGRESS", "0")  # Ray Data's progress bars: not in a log file
    return console, out, err


def cmd_run(args: argparse.Namespace) -> int:
    from modelworks.config import apply_overrides, load_workflow_file
    from modelworks.pipeline.graph import user_steps

    cfg, namespace = load_workflow_file(args.workflow)
    steps = user_steps(namespace)
    overrides = run_overrides(args)
    if args.cluster:  # its address and storage into the environment, its --set items before the command line's
        from modelworks.profiles import apply_to_run, load_profile

        profile = load_profile(args.cluster)
        overrides = apply_to_run(profile, apply_overrides(cfg, overrides), overrides, bool(args.resume)) + overrides
    cfg = apply_overrides(cfg, overrides)
    if args.resume:
        cfg = _config_of_run(args.resume, given_name=args.name, overrides=overrides)
        args.name = args.resume
    if args.data_dir:
        os.environ["MODELWORKS_DATA_DIR"] = args.data_dir  # read by Ray tasks too
    if args.steps:  # the graph only: nothing runs, Ray does not start
        from modelworks.pipeline.builtins import default_graph

        print("\n".join(default_graph(cfg, steps).describe()))
        return 0

    from modelworks.workflow import result_json, run_workflow

    console, out, err = run_console(args)
    try:
        result = run_workflow(cfg, run_name=args.name, data_dir=args.data_dir, log=console, user_steps=steps,
                              no_cache=args.no_cache, rerun=tuple(args.rerun or ()))
    except Exception as exc:  # noqa: BLE001 - one line on the terminal, the traceback in the run's log
        if console.log_path is None:
            raise
        return report_failure(exc, console.log_path, err)
    if args.json:
        print(result_json(result), file=out, flush=True)
    else:
        if result.task == "language_model":
            scored = ("validation", f"loss {result.val_loss:.4f}  perplexity {result.val_perplexity:.2f}"
                      if result.val_loss is not None else "not evaluated")
        else:
            scored = ("test", f"R² {result.test_r2:.4f}  MAE {result.test_mae:.4g}  RMSE {result.test_rmse:.4g}"
                      if result.task == "regression" else f"accuracy {result.test_accuracy:.4f}")
        console.summary([
            ("model", f"{result.model or '(not registered)'}{'  [production]' if result.production else ''}"),
            scored,
            ("report", result.report),
            ("run", f"{result.run_dir}  ({result.seconds:.1f} s: {console.step_times()})"),
        ])
    if args.serve:
        serve_result(cfg, result, args, out, err)
    return 0


def _config_of_run(run: str, *, given_name: str | None, overrides: list[str]):
    """--resume RUN: the config that run was started with (saved in its folder), whatever the file says now."""
    from modelworks.config import validate
    from modelworks.runtime import runs_root

    if given_name or overrides:
        raise UserError("--resume RUN continues that run with its own config: drop --name/--set/--workers/--gpu")
    saved = runs_root() / run / "workflow_config.json"
    if not saved.is_file():
        raise UserError(f"--resume {run}: no such run in {runs_root()}; `modelworks runs list` shows the runs")
    return validate(json.loads(saved.read_text()))


def serve_result(cfg, result, args: argparse.Namespace, out=None, err=None) -> None:
    """The workflow's last step with --serve: deploy the version this run registered (the workflow's
    `serve` section configures it) and serve until Ctrl-C / SIGTERM, like `modelworks serve`."""
    if not result.model:
        raise UserError("--serve: this run registered no model (registry.enabled is false), so there is "
                        "nothing to serve")
    from modelworks.serve import deploy_workflow_model
    from modelworks.serve.cli import announce, catch_sigterm, serve_until_stopped

    stop = threading.Event()
    info = deploy_workflow_model(cfg, result.model, host=args.host, port=args.port,
                                 on_connected=lambda: catch_sigterm(stop))
    announce(info, cfg.serve, file=out)
    serve_until_stopped(info["app"], stop, file=err)


def cmd_models(args: argparse.Namespace) -> int:
    from modelworks.registry import Registry

    reg = Registry(args.registry)
    if args.models_cmd == "list":
        rows = []
        for name in reg.models():
            for v in reg.versions(name):
                info = reg.info(name, v)
                rows.append({"model": f"{name}@{v}", "aliases": info["aliases"],
                             "test_accuracy": info.get("test_accuracy"), "test_r2": info.get("test_r2"),
                             "val_loss": info.get("val_loss") if info.get("task") == "language_model" else None,
                             "created": info.get("created")})
        if args.json:
            print(json.dumps(rows))
        elif not rows:
            print(f"no models in {reg.uri}")
        for r in rows if not args.json else []:
            score = (f"r2={r['test_r2']:.4f}" if r["test_r2"] is not None else
                     f"val_loss={r['val_loss']:.4f}" if r["val_loss"] is not None else
                     f"acc={r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "acc=-")
            print(f"{r['model']:<28} {score}  {r['created']}  {' '.join(r['aliases'])}")
        return 0
    if args.models_cmd == "show":
        from modelworks.pipeline.manifest import lineage

        name, version = reg.resolve(args.ref)
        info = reg.info(name, version)
        info.update(path=str(reg.checkpoint_dir(name, version)), lineage=lineage(info) or info.get("lineage"))
        print(json.dumps(info, indent=2))
        return 0
    # promote
    name, version = reg.resolve(f"{args.name}@{args.version}")
    reg.set_alias(name, args.alias, version)
    print(f"{name}: {args.alias} -> version {version}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample from a registered language model in this process (no Ray, no Serve): the prompt, then the new
    characters as they are generated."""
    from modelworks.models.generation import generate
    from modelworks.registry import Registry
    from modelworks.serve.generate_schemas import GenerateSpec, parse_generate
    from modelworks.serve.schemas import InputError

    reg = Registry(args.registry)
    name, version = reg.resolve(args.model)
    loaded, version = reg.load(f"{name}@{version}")  # checksums verified
    if loaded.spec.get("head") != "lm":
        raise UserError(f"{name}@{version} is not a language model; `modelworks generate` samples only from one "
                        f"(serve this model with `modelworks serve {args.model}` and POST /predict)")
    pre = loaded.preprocessor
    body = {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_k": args.top_k, "seed": args.seed}
    try:  # the server's checks, without its size limits
        p = parse_generate(body, GenerateSpec(pre.chars, max_prompt_chars=sys.maxsize, max_new_tokens=sys.maxsize))
    except InputError as err:
        raise UserError(f"--{err.field.replace('_', '-')}: {err.message}; expected {err.expected}") from None
    import torch

    # One token at a time is latency-bound: intra-op threads only spin against each other (and against anything
    # else on the machine); measured here, 1,000 tokens of a small model took 1.2 s on 1 thread, 24 s on 2.
    torch.set_num_threads(1)
    out = sys.stdout
    out.write(p.prompt)
    out.flush()
    with torch.no_grad():
        for token in generate(loaded.model, pre.encode(p.prompt).tolist(), p.max_new_tokens,
                              temperature=p.temperature, top_k=p.top_k, random_seed=p.seed):
            out.write(pre.decode([token]))
            out.flush()
    out.write("\n")
    out.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelworks", description="Dataset to served model on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a workflow: ingest, train, evaluate, register")
    run.add_argument("workflow", help="workflow file, e.g. workflows/mnist.py")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    run.add_argument("--name", help="run name (default: workflow name + config hash; same name = resume)")
    run.add_argument("--data-dir", help="dataset folder (default: $MODELWORKS_DATA_DIR)")
    run.add_argument("--workers", type=int, help="training workers (train.workers)")
    run.add_argument("--gpu", action="store_true", help="train on GPUs (train.use_gpu)")
    run.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    run.add_argument("--steps", action="store_true", help="print the step graph and exit")
    run.add_argument("--no-cache", action="store_true", help="rerun every step (results are still cached)")
    run.add_argument("--resume", metavar="RUN", help="continue RUN (with the config it was started with): "
                                                     "finished steps are kept, the failed one resumes")
    run.add_argument("--rerun", action="append", metavar="STEP",
                     help="rerun STEP and every step downstream of it, cached or not (repeatable)")
    run.add_argument("--cluster", metavar="PROFILE",
                     help="run with cluster/profiles/PROFILE.yaml (a path also works): its Ray address, storage "
                          "and workers (an explicit --set wins)")
    run.add_argument("--verbose", action="store_true",
                     help="show Ray's own output live (default: it goes to runs/<run>/logs/ray.log)")
    run.add_argument("--serve", action="store_true",
                     help="then serve the registered version (Ray Serve, the workflow's serve section) until Ctrl-C")
    run.add_argument("--host", default="127.0.0.1", help="with --serve: address to bind (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="with --serve: HTTP port (default 8000)")
    run.set_defaults(func=cmd_run)

    models = sub.add_parser("models", help="the model registry")
    models.add_argument("--registry", help="registry root (default: $MODELWORKS_REGISTRY or $MODELWORKS_HOME/registry)")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    ls = msub.add_parser("list", help="all models and versions")
    ls.add_argument("--json", action="store_true")
    show = msub.add_parser("show", help="one version's metadata")
    show.add_argument("ref", help="NAME, NAME@VERSION or NAME@ALIAS")
    promote = msub.add_parser("promote", help="point an alias (default production) at a version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", default="production")
    models.set_defaults(func=cmd_models)

    gen = sub.add_parser("generate", help="sample text from a registered language model (in this process)",
                         description="Print PROMPT and then the model's continuation as it is generated.")
    gen.add_argument("model", help="NAME, NAME@VERSION or NAME@ALIAS of a language model")
    gen.add_argument("--prompt", required=True, help="the text to continue (characters of the model's vocabulary)")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="characters to generate (default 200)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0..2; 0 = greedy (default 1.0)")
    gen.add_argument("--top-k", type=int, help="sample from the K most likely characters only")
    gen.add_argument("--seed", type=int, help="random seed (same seed, same text)")
    gen.add_argument("--registry", help="registry root (default: $MODELWORKS_REGISTRY or $MODELWORKS_HOME/registry)")
    gen.set_defaults(func=cmd_generate)

    for module in EXTRA_COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_commands(sub)
    return p


# Modules that add their own subcommands: each has add_commands(subparsers), whose parsers set `func`.
EXTRA_COMMAND_MODULES = ("modelworks.serve.cli", "modelworks.tune.cli", "modelworks.runs", "modelworks.jobs")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - turn user errors into one line, re-raise the rest
        found = _find_user_error(exc)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2


def program() -> None:
    """The ``modelworks`` command: ``main``, then an exit that does not cost seconds (``main`` alone is what tests
    call in their own process)."""
    code = main()
    _skip_exit_costs()
    sys.exit(code)


def _skip_exit_costs() -> None:
    """Two things a finished command would otherwise wait ~2 s for, on 2 cores, after its last line: Ray's atexit
    shutdown first sleeps 0.5 s so that log lines finish printing (the CLI sends Ray's output to the run's log
    files; an explicit shutdown does not sleep), and the interpreter's last garbage collection walks every object
    PyTorch, sympy and the rest created at import. gc.freeze moves those objects out of that collection; the
    process still flushes and closes its files and runs its atexit handlers."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    gc.freeze()


if __name__ == "__main__":
    program()
