"""Closed-loop HTTP load on loopback: modelworks (Ray Serve, @serve.batch) vs a plain FastAPI + uvicorn
single-process server serving the same registered model, side by side in one run.

    .venv/bin/python bench/serve_load.py                       # MNIST-shaped 784-256-128-10 MLP stand-in
    .venv/bin/python bench/serve_load.py --model mnist@production --registry ~/.modelworks/registry

For each concurrency (1, 16, 64) and request size (1 and 64 images) it runs C keep-alive connections, each
sending its next request as soon as the previous answer arrives, for at most --seconds and --max-requests,
and reports req/s, images/s, p50/p99 latency and errors for both servers. Then it shows autoscaling: the
Serve deployment (1..2 replicas) under sustained load, and after it. Writes JSON (--out).

Both servers validate input with the same code (modelworks.serve.schemas) and run torch with one intra-op
thread; the plain server runs one forward pass per request (no batching). The load generator is a small
raw-asyncio HTTP/1.1 client so that it takes as little of the shared CPUs as possible.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


# -- the plain server (run as a subprocess: `serve_load.py --plain-server`) ---------------------------------
def plain_server(model: str, registry: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    from modelworks.registry import Registry
    from modelworks.serve import schemas

    torch.set_num_threads(1)
    loaded, version = Registry(registry).load(model)
    name = model.partition("@")[0]
    spec = schemas.InputSpec(tuple(loaded.preprocessor.input_shape), 256)
    names = [str(c) for c in loaded.class_names]
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request):
        raw = await request.body()
        try:
            x = schemas.parse_predict(json.loads(raw), spec, raw)
        except schemas.InputError as err:
            return Response(json.dumps(err.to_dict()), status_code=err.status, media_type="application/json")
        probs = loaded.predict_proba(x).numpy()
        preds = [{"label": names[int(k)], "label_index": int(k), "probabilities": dict(zip(names, map(float, row))),
                  "model_version": version} for k, row in zip(probs.argmax(1), probs)]
        return Response(json.dumps({"model": name, "model_version": version, "predictions": preds},
                                   separators=(",", ":")), media_type="application/json")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the load generator ----------------------------------------------------------------------------------
async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def closed_loop(port: int, path: str, body: bytes, concurrency: int, seconds: float, max_requests: int) -> dict:
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors = 0
    sent = 0
    t_end = time.perf_counter() + seconds

    async def conn():
        nonlocal errors, sent
        reader = writer = None
        while time.perf_counter() < t_end and sent < max_requests:
            sent += 1
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                status = await asyncio.wait_for(_read_response(reader), timeout=60)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                errors += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1
        if writer is not None:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(conn() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = len(latencies) - errors
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"requests": len(latencies) + 0, "ok": ok, "errors": errors, "wall_s": round(wall, 2),
            "req_per_s": round(ok / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def wait_http(port: int, path: str, timeout: float = 60) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server on port {port} did not come up")




def replicas(app: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments["ModelServer"].replica_states.get("RUNNING", 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="registered model (default: register an MNIST-shaped stand-in)")
    ap.add_argument("--registry", help="registry root (default: a temporary one)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--sizes", default="1,64", help="images per request")
    ap.add_argument("--seconds", type=float, default=6.0, help="per cell, per server")
    ap.add_argument("--max-requests", type=int, default=50_000, help="per cell, per server")
    ap.add_argument("--no-autoscale", action="store_true")
    ap.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                    help="haproxy: Serve's HAProxy + direct-ingress mode (RAY_SERVE_ENABLE_HA_PROXY/"
                         "RAY_SERVE_ENABLE_DIRECT_INGRESS, set before Ray starts); proxy: the default Python proxy")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.json"))
    ap.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_server:
        plain_server(args.model, args.registry, args.port)
        return 0

    if args.ingress == "haproxy":
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
                          RAY_SERVE_HAPROXY_NBTHREAD=os.environ.get("RAY_SERVE_HAPROXY_NBTHREAD", "1"))
    import ray
    from ray import serve

    from modelworks.config import ServeConfig
    from modelworks.registry import Registry
    from modelworks.serve.app import build

    tmp = tempfile.mkdtemp(prefix="mw-serve-bench-")
    registry = args.registry or str(Path(tmp) / "registry")
    reg = Registry(registry)
    model = args.model
    if not model:
        from modelworks.serve.testing import register_mnist_shaped

        model = f"mnist-bench@{register_mnist_shaped(reg)}"
    loaded, version = reg.load(model)
    shape = list(loaded.preprocessor.input_shape)
    dim = int(np.prod(shape))

    from modelworks.serve.testing import free_port

    plain_port, serve_port = free_port(), free_port()
    plain = subprocess.Popen([sys.executable, __file__, "--plain-server", "--model", model, "--registry", registry,
                              "--port", str(plain_port)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        # Side-by-side: one replica (the plain server is one process too).
        cfg = ServeConfig(min_replicas=1, max_replicas=1, max_batch_size=64, batch_wait_timeout_s=0.002,
                          max_queued_requests=1024, alias_poll_s=0)
        serve.run(build(model, registry, cfg), name="bench", route_prefix="/", blocking=False)
        wait_http(serve_port, "/readyz")
        wait_http(plain_port, "/healthz")

        rng = np.random.default_rng(0)
        bodies = {n: json.dumps({"inputs": rng.integers(0, 256, size=(n, dim)).tolist()}).encode()
                  for n in map(int, args.sizes.split(","))}
        servers = {"modelworks": serve_port, "plain_fastapi": plain_port}
        for port in servers.values():  # warm up both
            asyncio.run(closed_loop(port, "/predict", bodies[1], 4, 1.5, 2000))
        cells = []
        for n, body in bodies.items():
            for c in map(int, args.concurrency.split(",")):
                row = {"images_per_request": n, "concurrency": c}
                for label, port in servers.items():
                    r = asyncio.run(closed_loop(port, "/predict", body, c, args.seconds, args.max_requests))
                    r["images_per_s"] = round(r["req_per_s"] * n, 1)
                    row[label] = r
                row["images_per_s_ratio"] = round(row["modelworks"]["images_per_s"]
                                                  / max(row["plain_fastapi"]["images_per_s"], 1e-9), 2)
                cells.append(row)
                m, p = row["modelworks"], row["plain_fastapi"]
                print(f"n={n:<3} c={c:<3} modelworks {m['req_per_s']:>7.1f} req/s {m['images_per_s']:>8.1f} img/s "
                      f"p50 {m['p50_ms']:>6.1f} p99 {m['p99_ms']:>7.1f} err {m['errors']} | plain {p['req_per_s']:>7.1f} "
                      f"req/s {p['images_per_s']:>8.1f} img/s p50 {p['p50_ms']:>6.1f} p99 {p['p99_ms']:>7.1f} "
                      f"err {p['errors']} | ratio {row['images_per_s_ratio']}", flush=True)

        autoscale = None
        if not args.no_autoscale:
            serve.delete("bench")
            cfg = ServeConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=8, upscale_delay_s=2,
                              downscale_delay_s=5, max_batch_size=64, batch_wait_timeout_s=0.002, alias_poll_s=0)
            serve.run(build(model, registry, cfg), name="bench", route_prefix="/", blocking=False)
            wait_http(serve_port, "/readyz")
            timeline: list[tuple[float, int, str]] = []
            t0 = time.time()

            async def load_and_watch():
                task = asyncio.create_task(closed_loop(serve_port, "/predict", bodies[1], 64, 25, 10**9))
                while not task.done():
                    timeline.append((round(time.time() - t0, 1), replicas("bench"), "load"))
                    await asyncio.sleep(1)
                return await task

            load = asyncio.run(load_and_watch())
            t_idle = time.time()
            while time.time() - t_idle < 60:
                n_rep = replicas("bench")
                timeline.append((round(time.time() - t0, 1), n_rep, "idle"))
                if n_rep <= 1 and time.time() - t_idle > 3:
                    break
                time.sleep(1)
            peak = max(n for _, n, _ in timeline)
            autoscale = {"config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                                    "upscale_delay_s": 2, "downscale_delay_s": 5},
                         "load": load, "peak_replicas": peak, "final_replicas": timeline[-1][1],
                         "timeline": timeline, "cpus": os.cpu_count()}
            print(f"autoscaling: peak {peak} replicas under load ({load['req_per_s']} req/s, {load['errors']} errors), "
                  f"{timeline[-1][1]} after {timeline[-1][0] - (t_idle - t0):.0f}s idle", flush=True)

        target = next((c for c in cells if c["images_per_request"] == 1 and c["concurrency"] == 64), None)
        result = {"ingress": args.ingress, "model": model, "model_version": version, "input_shape": shape, "cpus": os.cpu_count(),
                  "seconds_per_cell": args.seconds, "cells": cells, "autoscaling": autoscale,
                  "target_c64_single_ratio": target and target["images_per_s_ratio"],
                  "target_met": bool(target and target["images_per_s_ratio"] >= 1.0
                                     and target["modelworks"]["errors"] == 0)}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}; c=64 single-image images/s ratio modelworks/plain = {result['target_c64_single_ratio']}")
        return 0
    finally:
        plain.terminate()
        plain.wait(timeout=10)
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001
            pass
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
