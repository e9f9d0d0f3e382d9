"""`modelworks serve ...` subcommands (added to the main CLI by modelworks.cli).

    modelworks serve MODEL[@VERSION|@ALIAS] [--host 127.0.0.1] [--port 8000] [--replicas MIN:MAX]
    modelworks serve MODEL@VERSION --rollout          move a running app to another version in place
    modelworks serve build MODEL -o serve_config.yaml  a config for `serve deploy` / a RayService
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from modelworks.errors import UserError


def parse_replicas(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi if sep else lo)
    except ValueError:
        raise UserError(f"--replicas expects MIN:MAX or N (e.g. 1:4), got '{text}'") from None
    if lo_i < 0 or hi_i < 1 or hi_i < lo_i:
        raise UserError(f"--replicas {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo_i, hi_i


def serve_config_from_args(args: argparse.Namespace):
    from modelworks.config import ServeConfig, apply_overrides, load_workflow

    sets = [s if s.startswith("serve.") else f"serve.{s}" for s in (args.set or [])]
    if args.replicas:
        lo, hi = parse_replicas(args.replicas)
        sets += [f"serve.min_replicas={lo}", f"serve.max_replicas={hi}"]
    if args.workflow:
        return apply_overrides(load_workflow(args.workflow), sets).serve
    if not sets:
        return ServeConfig()
    # Reuse the workflow validation (one line per problem) with a throwaway workflow around the section.
    from modelworks.config import WorkflowConfig

    return apply_overrides(WorkflowConfig(name="serve"), sets).serve


def cmd_serve(args: argparse.Namespace) -> int:
    if args.model == "build":
        return cmd_build(args)
    if args.target:
        raise UserError(f"unexpected argument '{args.target}' (did you mean `modelworks serve build MODEL`?)")
    from modelworks.serve import runner

    if args.rollout:
        info = runner.rollout(args.model, app_name=args.app, registry=args.registry)
        print(f"rolled out {info['model']} (version {info['version']}) to application '{info['app']}'")
        return 0
    cfg = serve_config_from_args(args)
    stop = threading.Event()
    # A model that is not there or fails its checksums stops here with one line, before any output moves.
    from modelworks.registry import default_root

    runner.verify_model(args.model, args.registry or default_root())
    out, err = sys.stdout, sys.stderr
    if not args.verbose:  # one ready line here; Ray's and Serve's own output goes to a log file
        from modelworks.console import capture_process_output, terminal_copy
        from modelworks.registry import home

        out, err = terminal_copy(1), terminal_copy(2)
        log_path = home() / "logs" / f"serve-{args.app or args.model.split('@')[0]}.log"
        capture_process_output(log_path)
    try:
        info = runner.start(args.model, registry=args.registry, serve_config=cfg, host=args.host, port=args.port,
                            app_name=args.app, on_connected=lambda: catch_sigterm(stop))
    except Exception as exc:  # noqa: BLE001 - one line on the terminal, the traceback in the log
        if args.verbose:
            raise
        from modelworks.cli import report_failure

        return report_failure(exc, log_path, err)
    announce(info, cfg, file=out)
    if not args.verbose:
        print(f"Ray's output: {log_path}", file=out, flush=True)
    if not args.detach:
        serve_until_stopped(info["app"], stop, file=err)
    return 0


def announce(info: dict, cfg, file=None) -> None:
    print(f"serving {info['model']} (version {info['version']}) at {info['url']}  "
          f"[docs: {info['url']}/docs, replicas {cfg.min_replicas}..{cfg.max_replicas}]", file=file or sys.stdout,
          flush=True)


def catch_sigterm(stop: threading.Event) -> None:
    """SIGTERM sets ``stop``. Install it after Ray is up (ray.init sets its own handler) and before Serve
    starts, so a SIGTERM while the app deploys is a clean stop, not Ray's abort."""
    signal.signal(signal.SIGTERM, lambda *_: stop.set())


def serve_until_stopped(app_name: str, stop: threading.Event, file=None) -> None:
    """Block until Ctrl-C or SIGTERM, then delete the application (what `modelworks serve` and
    `modelworks run --serve` do after starting it)."""
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.delete(app_name)
    print("stopped", file=file or sys.stderr)


def cmd_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modelworks.registry import default_root
    from modelworks.serve.config_builder import build_config, write_config

    if not args.target:
        raise UserError("usage: modelworks serve build MODEL -o serve_config.yaml")
    if not args.output:
        raise UserError("serve build needs -o FILE (e.g. -o serve_config.yaml)")
    registry = args.registry or default_root()
    if "://" not in registry:
        registry = str(Path(registry).resolve())
    from modelworks.registry import Registry

    Registry(registry).resolve(args.target)  # a typo fails here, not on the cluster
    cfg = serve_config_from_args(args)
    config = build_config(args.target, registry=registry, serve_config=cfg, host=args.host, port=args.port,
                          app_name=args.app)
    path = write_config(config, args.output)
    print(json.dumps({"written": str(path), "model": args.target, "host": args.host, "port": args.port}))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a registered model with Ray Serve (or: serve build MODEL -o FILE)",
        description="Serve MODEL (NAME, NAME@VERSION or NAME@ALIAS) over HTTP with Ray Serve. "
                    "`modelworks serve build MODEL -o serve_config.yaml` writes a config for `serve deploy`.")
    p.add_argument("model", help="NAME[@VERSION|@ALIAS], or 'build'")
    p.add_argument("target", nargs="?", help="with 'build': the model to write a config for")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", metavar="MIN:MAX", help="autoscaling bounds (serve.min/max_replicas)")
    p.add_argument("--workflow", help="take the serve settings from this workflow file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a serve setting, e.g. max_batch_size=32")
    p.add_argument("--registry", help="registry root (default: $MODELWORKS_REGISTRY or $MODELWORKS_HOME/registry)")
    p.add_argument("--app", help="Serve application name (default: the model name)")
    p.add_argument("--rollout", action="store_true", help="move the running application to MODEL in place")
    p.add_argument("--detach", action="store_true", help="return after deploying (with RAY_ADDRESS set)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and Serve's own output live (default: $MODELWORKS_HOME/logs/serve-APP.log)")
    p.add_argument("-o", "--output", help="with 'build': where to write the config")
    p.set_defaults(func=cmd_serve)
