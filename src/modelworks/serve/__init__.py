"""Ray Serve deployment of registered models. Importing this package does not import Ray. One file per job:

    app.py                the Serve application: the ModelServer deployment, its routes, build() (imports Ray)
    served.py             what a replica serves: a registry version loaded, with its input spec (Served)
    http.py               the FastAPI app the routes hang on, its JSON errors, reading a request body
    schemas.py            input validation (InputError, the input specs), the /predict request and response
    v2_schemas.py         the Open Inference Protocol v2: infer bodies, binary tensor data, responses, metadata
    generate_schemas.py   POST /generate's request, response and their validation
    generation_engine.py  a replica's generations, batched: one BatchedGenerator, a queue per request
    config_builder.py     the deployment options, and a config file for `serve deploy` or a RayService
    runner.py             starting, updating and stopping the application (the Ray side of `modelworks serve`)
    cli.py                the `modelworks serve ...` subcommands
    testing.py            small registered models for the serve tests and the serve benchmark

    from modelworks.serve import deploy
    deploy("digits@production", serve_config=cfg.serve)        # a workflow's last step
"""
from __future__ import annotations

import os

# Ray Serve's high-throughput mode (Ray >= 2.55), read by Ray's processes when they start, so it must be in
# the environment before ray.init / `ray start`:
# - HAProxy (C) is the HTTP ingress and forwards straight to each replica's own HTTP server: no Python proxy
#   hop. THROUGHPUT_OPTIMIZED also runs user code on the replica's main event loop (no thread hop per
#   request) and buffers request-path logs. Measured here (bench/serve_load.py, 1 replica, 64 concurrent
#   single-image requests, 2 cores): 370 req/s with Serve's default Python proxy, ~1,670 with these.
# - Ray starts workers at nice 15, so any busy process on the box (a load balancer, a client, another
#   server) starves a serving replica; 0 is ordinary priority (~+25 % req/s in the same measurement).
# - A direct-ingress replica being stopped (rollout, downscale, shutdown) first stays up this long so that
#   load balancers can deregister it. Ray's default, 30 s, is for cloud balancers polling health checks;
#   HAProxy is told by the Serve controller within about a second (and retries refused connections), and 30 s
#   made every `serve.shutdown` hit its 30 s timeout and leave a dying controller behind.
# - THROUGHPUT_OPTIMIZED buffers a replica's log lines 1,000 at a time; 1 writes each line as it comes (with
#   serve.access_log off, the default, a replica logs little besides model loads and errors).
# - THROUGHPUT_OPTIMIZED also moves deployment-handle routing onto the caller's event loop, which makes
#   handles unusable from plain (non-async) code such as a driver script; keep Serve's separate router loop
#   (this app calls no other deployment, so replicas lose nothing).
# Each is a default: a value already in the environment wins (e.g. RAY_SERVE_ENABLE_HA_PROXY=0).
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_worker_niceness": "0",
}


# Side ports Serve opens at fixed numbers on every node in this mode: HAProxy stats (8404) and metrics (9101),
# the fallback Python proxy (8500, 9500). A Ray started privately on a machine takes free ones instead, so two
# `modelworks serve` on one machine (or one beside a Prometheus exporter on 9101) do not collide.
LOCAL_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                   "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_serve_env(local: bool = False) -> None:
    """Put SERVE_ENV into this process's environment (Ray started from here inherits it); ``local``: Ray is
    about to be started privately here, so Serve's side ports get free numbers too."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    if local:
        for key in LOCAL_PORT_VARS:
            os.environ.setdefault(key, str(free_port()))
        # HAProxy runs 4 threads by default; more threads than cores only contend (2 cores: 2 threads gave
        # ~5 % more req/s than 4, and 1 thread ~15 % less, in bench/serve_load.py's 1-replica cell).
        os.environ.setdefault("RAY_SERVE_HAPROXY_NBTHREAD", str(min(4, os.cpu_count() or 1)))


def deploy(model: str, **kwargs):
    """Start (or update) the Serve application for ``model``; see ``modelworks.serve.runner.start``."""
    from modelworks.serve.runner import start

    return start(model, **kwargs)


def deploy_workflow_model(cfg, model_ref: str, **kwargs):
    """Deploy a workflow's registered model with the workflow's ``serve`` section."""
    from modelworks.serve.runner import start

    return start(model_ref, serve_config=cfg.serve, **kwargs)


__all__ = ["SERVE_ENV", "apply_serve_env", "free_port", "deploy", "deploy_workflow_model"]
