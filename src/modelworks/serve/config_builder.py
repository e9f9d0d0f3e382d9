"""`modelworks serve build MODEL -o serve_config.yaml`: a Serve config file that `serve deploy` accepts, and the
deployment options it holds (``deployment_options``, which app.build deploys with too).

The same file is the ``serveConfigV2`` of the KubeRay RayService in ``cluster/``. It binds 127.0.0.1
unless a host is given (a config file left alone would default to 0.0.0.0). The cluster's nodes should start
with ``modelworks.serve.SERVE_ENV`` in their environment (Serve's fast HAProxy ingress; cluster/ sets it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from modelworks.config import ServeConfig
from modelworks.errors import UserError


def deployment_options(cfg: ServeConfig, model: str, registry: str) -> dict:
    max_ongoing = max(cfg.max_batch_size, int(np.ceil(cfg.target_ongoing_requests * 2)))
    return {
        # A full batch must fit in one replica's concurrency, and autoscaling targets must be reachable.
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": cfg.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "initial_replicas": max(cfg.min_replicas, 1),
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
        },
        "user_config": {"model": model, "registry": registry},
        "logging_config": {"enable_access_log": cfg.access_log},
        "ray_actor_options": {"num_cpus": cfg.replica_cpus},
        "graceful_shutdown_timeout_s": max(5.0, cfg.request_timeout_s),
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
    }


def build_config(model: str, *, registry: str, serve_config: ServeConfig, host: str = "127.0.0.1",
                 port: int = 8000, app_name: str | None = None) -> dict[str, Any]:
    from modelworks.serve.app import DEPLOYMENT

    opts = deployment_options(serve_config, model, registry)
    deployment = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": opts["max_ongoing_requests"],
        "max_queued_requests": opts["max_queued_requests"],
        "autoscaling_config": opts["autoscaling_config"],
        "user_config": opts["user_config"],
        "logging_config": opts["logging_config"],
        "ray_actor_options": opts["ray_actor_options"],
        "graceful_shutdown_timeout_s": opts["graceful_shutdown_timeout_s"],
        "health_check_period_s": opts["health_check_period_s"],
        "health_check_timeout_s": opts["health_check_timeout_s"],
    }
    config = {
        "proxy_location": serve_config.proxy_location,
        "http_options": {"host": host, "port": port, "request_timeout_s": serve_config.request_timeout_s},
        "applications": [{
            "name": app_name or model.partition("@")[0],
            "route_prefix": "/",
            "import_path": "modelworks.serve.app:build_app",
            "args": {"model": model, "registry": registry, "serve": serve_config.model_dump(mode="json")},
            "deployments": [deployment],
        }],
    }
    validate_config(config)
    return config


def validate_config(config: dict) -> None:
    """Check against Serve's own schema (what `serve deploy` validates)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
            else ServeDeploySchema.parse_obj(config)
    except ValidationError as err:
        raise UserError(f"serve config is not valid for `serve deploy`: {err}") from None


def write_config(config: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Written by `modelworks serve build`. Deploy with `serve deploy " + path.name + "` on a running\n"
              "# Ray cluster, or paste under a RayService's serveConfigV2 (see cluster/).\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path
