"""Starting, updating and stopping the Serve application (the Ray side of `modelworks serve`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from modelworks.config import ServeConfig
from modelworks.errors import UserError
from modelworks.registry import Registry, default_root, home
from modelworks.serve import apply_serve_env


def _state_path(app_name: str) -> Path:
    return home() / "serve" / f"{app_name}.json"


def verify_model(model: str, registry: str | None) -> tuple[str, int]:
    """Resolve and load once here, so a missing or corrupt version fails with one line before Ray starts."""
    reg = Registry(registry)
    name, version = reg.resolve(model)
    reg.load(f"{name}@{version}")  # CheckpointError (a UserError) when checksums do not match
    return name, version


def connect(start_local: bool = True) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Only takes effect for a Ray started here; a cluster needs SERVE_ENV in its nodes' environment.
    apply_serve_env(local=not address and start_local)
    if address:
        ray.init(address=address, log_to_driver=False)
    elif start_local:  # on loopback, with token auth (see init_private_ray)
        from modelworks.runtime import init_private_ray

        init_private_ray(log_to_driver=False)
    else:
        try:
            ray.init(address="auto", log_to_driver=False)
        except ConnectionError:
            raise UserError("no running Ray cluster found; start one with `modelworks serve MODEL` "
                            "(or set RAY_ADDRESS)") from None


def start(model: str, *, registry: str | None = None, serve_config: ServeConfig | None = None,
          host: str = "127.0.0.1", port: int = 8000, app_name: str | None = None,
          on_connected: Callable[[], None] | None = None) -> dict:
    """Deploy ``model`` as application ``app_name`` (default: the model name) on route ``/``.

    ``on_connected`` runs once Ray is up and before Serve starts (the CLI installs its SIGTERM handler there:
    ray.init sets its own, and a SIGTERM while the app deploys must be a clean stop)."""
    from ray import serve

    from modelworks.serve.app import build

    cfg = serve_config or ServeConfig()
    registry = registry or default_root()
    if "://" not in registry:
        registry = str(Path(registry).resolve())
    name, version = verify_model(model, registry)
    app_name = app_name or name
    connect()
    if on_connected is not None:
        on_connected()
    serve.start(proxy_location=cfg.proxy_location,
                http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build(model, registry, cfg), name=app_name, route_prefix="/", blocking=False)
    state = {"model": model, "registry": registry, "serve": cfg.model_dump(mode="json"), "host": host,
             "port": port, "app": app_name}
    path = _state_path(app_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))
    return {**state, "url": f"http://{host}:{port}", "version": version}


def rollout(model: str, *, app_name: str | None = None, registry: str | None = None) -> dict:
    """Move a running application to ``model`` in place: same code and options, new ``user_config``,
    so Serve calls ``reconfigure`` on the live replicas (no restart, in-flight requests finish)."""
    from ray import serve

    from modelworks.serve.app import build

    app_name = app_name or model.partition("@")[0]
    path = _state_path(app_name)
    if not path.is_file():
        raise UserError(f"no application '{app_name}' was started from this MODELWORKS_HOME ({path} missing); "
                        f"start it with `modelworks serve {model}`")
    state = json.loads(path.read_text())
    registry = registry or state["registry"]
    name, version = verify_model(model, registry)
    connect(start_local=False)
    serve.run(build(model, registry, ServeConfig(**state["serve"])), name=app_name, route_prefix="/",
              blocking=False)
    state.update(model=model, registry=registry)
    path.write_text(json.dumps(state, indent=2))
    return {**state, "version": version}
