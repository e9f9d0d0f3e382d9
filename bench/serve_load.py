"""Closed-loop HTTP load on loopback: modelworks (Ray Serve, @serve.batch) vs a plain FastAPI + uvicorn
single-process server serving the same registered model, side by side in one run.

    .venv/bin/python bench/serve_load.py                       # MNIST-shaped 784-256-128-10 MLP stand-in
    .venv/bin/python bench/serve_load.py --hidden 1024,1024    # a model whose forward pass costs more
    .venv/bin/python bench/serve_load.py --model text --sizes 1 --concurrency 64   # SST-2-sized Transformer
    .venv/bin/python bench/serve_load.py --model mnist@production --registry ~/.modelworks/registry

`--model text` registers a Transformer classifier of workflows/sst2.py's size (d_model 128, 4 layers, 4 heads,
d_ff 512, max_len 64) with random weights and a BPE tokenizer (vocabulary 8,000) fitted on SST-2's
training sentences ($MODELWORKS_DATA_DIR/sst2/train.csv.gz; generated sentences when absent), and sends
SST-2 validation sentences (or generated ones), each request its own sentence(s). Rates are then sentences/s.

For each concurrency (1, 16, 64) and request size (1 and 64 images) it runs C keep-alive connections, each
sending its next request as soon as the previous answer arrives, for at most --seconds and --max-requests,
and reports req/s, images/s, p50/p99 latency and errors for:
  modelworks                 the Serve app with 1 replica (the side-by-side the target is stated for)
  plain_fastapi              FastAPI + uvicorn, one process
  modelworks_2_replicas      the Serve app scaled to 2 replicas (what autoscaling gives it on 2 cores)
  plain_fastapi_2_workers    uvicorn --workers 2: the same scale-out for the plain server, for reference
Then it shows autoscaling: the Serve deployment (1..2 replicas) under sustained load, and after it.
Writes JSON (--out).

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
def plain_app():
    """The plain server's app (a factory, so that uvicorn's worker processes can each build one)."""
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    from modelworks.config import ServeConfig
    from modelworks.registry import Registry
    from modelworks.serve import schemas

    model, registry = os.environ["MW_BENCH_MODEL"], os.environ["MW_BENCH_REGISTRY"]
    torch.set_num_threads(1)
    loaded, version = Registry(registry).load(model)
    name = model.partition("@")[0]
    spec = schemas.spec_for(loaded.preprocessor, (loaded.config.get("data") or {}).get("source"), 256,
                            ServeConfig().max_text_chars)
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

    return app


def plain_server(model: str, registry: str, port: int, workers: int) -> None:
    import uvicorn

    os.environ.update(MW_BENCH_MODEL=model, MW_BENCH_REGISTRY=registry)
    uvicorn.run("serve_load:plain_app", factory=True, app_dir=str(Path(__file__).parent), workers=workers,
                host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the load generator ----------------------------------------------------------------------------------
async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep_alive): a server that answers `Connection: close` (HAProxy does while it reloads after a
    replica change) must get a new connection for the next request, as any HTTP client would open."""
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
    return status, headers.get("connection", "").lower() != "close"


async def closed_loop(port: int, path: str, bodies: list[bytes], concurrency: int, seconds: float,
                      max_requests: int) -> dict:
    """Request i sends bodies[i % len(bodies)] (the text bench sends different sentences)."""
    payloads = [(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode() + body for body in bodies]
    latencies: list[float] = []
    errors = 0
    error_kinds: dict[str, int] = {}
    sent = 0
    t_end = time.perf_counter() + seconds

    async def conn():
        nonlocal errors, sent
        reader = writer = None
        while time.perf_counter() < t_end and sent < max_requests:
            request = payloads[sent % len(payloads)]
            sent += 1
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                status, keep_alive = await asyncio.wait_for(_read_response(reader), timeout=60)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as err:
                errors += 1
                error_kinds[type(err).__name__] = error_kinds.get(type(err).__name__, 0) + 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1
                error_kinds[f"HTTP {status}"] = error_kinds.get(f"HTTP {status}", 0) + 1
            if not keep_alive:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(conn() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = len(latencies) - errors
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"requests": len(latencies) + 0, "ok": ok, "errors": errors, "wall_s": round(wall, 2),
            "req_per_s": round(ok / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "error_kinds": error_kinds}


def sst2_sentences(split: str) -> list[str] | None:
    """SST-2 sentences of ``split`` from $MODELWORKS_DATA_DIR/sst2, or None when the dataset is not there."""
    path = Path(os.environ.get("MODELWORKS_DATA_DIR", "")) / "sst2" / f"{split}.csv.gz"
    if not os.environ.get("MODELWORKS_DATA_DIR") or not path.is_file():
        return None
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False)["text"].tolist()


def generated_sentences(n: int, random_seed: int) -> list[str]:
    """Review-like sentences of 3..30 words, for when SST-2 is not at hand."""
    rng = np.random.default_rng(random_seed)
    words = ("the a this film movie story cast plot script director actors scenes ending music is was feels "
             "looks becomes remains never always quite very too rather so and but yet with without of in about "
             "gorgeous witty moving brilliant charming dull tedious boring clumsy lifeless awful funny smart "
             "sentimental predictable ambitious messy thoughtful bland painful touching superb wonderful").split()
    return [" ".join(rng.choice(words, size=rng.integers(3, 31))) for _ in range(n)]


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp",
                    help="registered model NAME@VERSION|ALIAS, or a stand-in registered for the run: "
                         "mlp (MNIST-shaped, see --hidden) or text (SST-2-sized Transformer)")
    ap.add_argument("--registry", help="registry root (default: a temporary one)")
    ap.add_argument("--hidden", default="256,128",
                    help="hidden layers of the stand-in MLP (784-...-10); wider = more compute per image")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--sizes", default="1,64", help="images (or sentences) per request")
    ap.add_argument("--seconds", type=float, default=6.0, help="per cell, per server")
    ap.add_argument("--max-requests", type=int, default=50_000, help="per cell, per server")
    ap.add_argument("--no-autoscale", action="store_true")
    ap.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                    help="haproxy: what `modelworks serve` runs (modelworks.serve.SERVE_ENV: HAProxy ingress, "
                         "throughput-optimized Serve); proxy: Serve's default Python proxy")
    ap.add_argument("--no-scaled", action="store_true", help="skip the 2-replica / 2-worker columns")
    ap.add_argument("--out", help="default: bench/results/serve_load.json (serve_load_text.json for text models)")
    ap.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_server:
        plain_server(args.model, args.registry, args.port, args.workers)
        return 0

    from modelworks.serve import SERVE_ENV, apply_serve_env

    if args.ingress == "proxy":  # Serve's default ingress, for comparison
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="0", RAY_SERVE_THROUGHPUT_OPTIMIZED="0")
    apply_serve_env(local=True)  # what `modelworks serve` runs with
    import ray
    from ray import serve

    from modelworks.config import ServeConfig
    from modelworks.registry import Registry
    from modelworks.serve.app import build

    tmp = tempfile.mkdtemp(prefix="mw-serve-bench-")
    registry = args.registry or str(Path(tmp) / "registry")
    reg = Registry(registry)
    model, sentences_from = args.model, None
    if model == "mlp":
        from modelworks.serve.testing import register_mnist_shaped

        hidden = tuple(int(h) for h in args.hidden.split(","))
        model = f"mnist-bench@{register_mnist_shaped(reg, hidden=hidden)}"
    elif model == "text":
        from modelworks.serve.testing import register_text_shaped

        train = sst2_sentences("train")
        t_fit = time.perf_counter()
        model = f"sst2-bench@{register_text_shaped(reg, train or generated_sentences(20_000, random_seed=1))}"
        print(f"registered {model}: tokenizer fitted on {'SST-2 train' if train else 'generated'} sentences "
              f"in {time.perf_counter() - t_fit:.1f}s", flush=True)
    loaded, version = reg.load(model)
    is_text = loaded.preprocessor.raw_column == "text"
    unit = "sentences" if is_text else "images"  # what the rates count
    shape = None if is_text else list(loaded.preprocessor.input_shape)
    out_path = Path(args.out or REPO / "bench" / "results" / f"serve_load{'_text' if is_text else ''}.json")

    from modelworks.serve.testing import free_port, running_replicas

    plain_port, plain2_port, serve_port = free_port(), free_port(), free_port()
    scaled = not args.no_scaled and (os.cpu_count() or 1) >= 2

    def start_plain(port: int, workers: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--plain-server", "--model", model, "--registry",
                                 registry, "--port", str(port), "--workers", str(workers)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    plains = [start_plain(plain_port, 1)] + ([start_plain(plain2_port, 2)] if scaled else [])
    try:
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})

        def deploy(n_replicas: int) -> None:
            cfg = ServeConfig(min_replicas=n_replicas, max_replicas=n_replicas, max_batch_size=64,
                              batch_wait_timeout_s=0.002, max_queued_requests=1024, alias_poll_s=0,
                              replica_cpus=min(1.0, (os.cpu_count() or 2) / n_replicas))
            serve.run(build(model, registry, cfg), name="bench", route_prefix="/", blocking=False)
            wait_http(serve_port, "/readyz")
            deadline = time.time() + 60
            while running_replicas("bench") < n_replicas and time.time() < deadline:
                time.sleep(0.5)

        sizes = [int(n) for n in args.sizes.split(",")]
        if is_text:  # 256 different requests per size, cycled: the tokenizer and padding see real variety
            sentences = sst2_sentences("validation")
            sentences_from = "sst2/validation" if sentences else "generated"
            sentences = sentences or generated_sentences(1000, random_seed=2)
            shuffled = [sentences[i] for i in np.random.default_rng(0).permutation(len(sentences))]

            def text_body(i: int, n: int) -> bytes:
                texts = [shuffled[(i * n + k) % len(shuffled)] for k in range(n)]
                return json.dumps({"input": texts[0]} if n == 1 else {"inputs": texts}).encode()

            bodies = {n: [text_body(i, n) for i in range(256)] for n in sizes}
        else:
            rng = np.random.default_rng(0)
            dim = int(np.prod(shape))
            bodies = {n: [json.dumps({"inputs": rng.integers(0, 256, size=(n, dim)).tolist()}).encode()]
                      for n in sizes}
        cells = {(n, c): {f"{unit}_per_request": n, "concurrency": c}
                 for n in bodies for c in map(int, args.concurrency.split(","))}
        abbrev = "sent/s" if is_text else "img/s"

        def run_cells(servers: dict[str, int]) -> None:
            for port in servers.values():  # warm up
                asyncio.run(closed_loop(port, "/predict", bodies[min(bodies)], 4, 1.5, 2000))
            for (n, c), row in cells.items():
                for label, port in servers.items():
                    r = asyncio.run(closed_loop(port, "/predict", bodies[n], c, args.seconds, args.max_requests))
                    r[f"{unit}_per_s"] = round(r["req_per_s"] * n, 1)
                    row[label] = r
                    print(f"n={n:<3} c={c:<3} {label:<24} {r['req_per_s']:>7.1f} req/s {r[f'{unit}_per_s']:>8.1f} "
                          f"{abbrev} p50 {r['p50_ms']:>6.1f} ms p99 {r['p99_ms']:>7.1f} ms errors {r['errors']}",
                          flush=True)

        # Side by side: one replica against one plain process, each cell back to back.
        deploy(1)
        wait_http(plain_port, "/healthz")
        run_cells({"modelworks": serve_port, "plain_fastapi": plain_port})
        if scaled:  # both scaled out to 2 processes
            deploy(2)
            wait_http(plain2_port, "/healthz")
            run_cells({"modelworks_2_replicas": serve_port, "plain_fastapi_2_workers": plain2_port})
        rate, ratio = f"{unit}_per_s", f"{unit}_per_s_ratio"
        for row in cells.values():
            base = max(row["plain_fastapi"][rate], 1e-9)
            row[ratio] = round(row["modelworks"][rate] / base, 2)
            if scaled:
                row[f"{ratio}_2_replicas"] = round(row["modelworks_2_replicas"][rate] / base, 2)
                row[f"{ratio}_2_vs_2"] = round(
                    row["modelworks_2_replicas"][rate] / max(row["plain_fastapi_2_workers"][rate], 1e-9), 2)
        cells = list(cells.values())
        print(f"{unit}/s ratio to plain_fastapi (1 process): " + ", ".join(
            f"n={r[f'{unit}_per_request']} c={r['concurrency']}: {r[ratio]}"
            + (f" (2 replicas {r[f'{ratio}_2_replicas']}, 2 vs 2 workers {r[f'{ratio}_2_vs_2']})"
               if scaled else "") for r in cells), flush=True)

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
                task = asyncio.create_task(closed_loop(serve_port, "/predict", bodies[min(bodies)], 64, 25, 10 ** 9))
                while not task.done():
                    timeline.append((round(time.time() - t0, 1), running_replicas("bench"), "load"))
                    await asyncio.sleep(1)
                return await task

            load = asyncio.run(load_and_watch())
            t_idle = time.time()
            while time.time() - t_idle < 60:
                n_rep = running_replicas("bench")
                timeline.append((round(time.time() - t0, 1), n_rep, "idle"))
                if n_rep <= 1 and time.time() - t_idle > 3:
                    break
                time.sleep(1)
            peak = max(n for _, n, _ in timeline)
            autoscale = {"config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                                    "upscale_delay_s": 2, "downscale_delay_s": 5},
                         "load": load, "peak_replicas": peak, "final_replicas": timeline[-1][1],
                         "timeline": timeline, "cpus": os.cpu_count()}
            print(f"autoscaling: peak {peak} replicas under load ({load['req_per_s']} req/s, {load['errors']} errors "
                  f"{load['error_kinds'] or ''}), "
                  f"{timeline[-1][1]} after {timeline[-1][0] - (t_idle - t0):.0f}s idle", flush=True)

        target = next((c for c in cells if c[f"{unit}_per_request"] == 1 and c["concurrency"] == 64), None)

        def met(key: str, label: str) -> bool:
            return bool(target and key in target and target[key] >= 1.0 and target[label]["errors"] == 0)

        result = {"ingress": args.ingress, "hidden": args.hidden if args.model == "mlp" else None,
                  "env": {k: os.environ.get(k) for k in SERVE_ENV}, "model": model, "model_version": version,
                  "model_spec": loaded.spec, "unit": unit, "input_shape": shape, "sentences": sentences_from,
                  "cpus": os.cpu_count(), "seconds_per_cell": args.seconds, "cells": cells, "autoscaling": autoscale,
                  "target_c64_single_ratio": target and target[ratio],
                  "target_met_1_replica": met(ratio, "modelworks"),
                  "target_c64_single_ratio_2_replicas": target and target.get(f"{ratio}_2_replicas"),
                  "target_met_2_replicas": met(f"{ratio}_2_replicas", "modelworks_2_replicas")}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))
        print(f"wrote {out_path}; c=64 single-{unit[:-1]} {unit}/s, modelworks / plain (1 process): "
              f"1 replica {result['target_c64_single_ratio']}, "
              f"2 replicas {result['target_c64_single_ratio_2_replicas']}")
        return 0
    finally:
        for p in plains:
            p.terminate()
            p.wait(timeout=10)
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001
            pass
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
