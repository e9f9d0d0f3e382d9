"""The Ray Serve application: one deployment (``ModelServer``) with a FastAPI ingress.

* The model comes only from the registry (``Registry.load`` verifies checksums); requests never name a file.
* ``user_config = {"model": "name@version|alias", "registry": root}``: a change reaches running replicas
  through ``reconfigure`` (in place, in-flight batches finish on the model they started with). A replica
  serving ``name@alias`` also re-resolves the alias every ``serve.alias_poll_s`` seconds, so
  ``modelworks models promote`` moves the served model without a redeploy.
* ``@serve.batch`` groups concurrent requests into one forward pass; autoscaling, ``max_queued_requests``
  (503 when full) and the timeouts come from ``ServeConfig``.
* Image/vector models take numbers (or PNGs); text models take strings, tokenized in the replica by the
  checkpoint's own tokenizer, one batch at a time (padded to the batch's longest text); table models take
  named columns, preprocessed in the replica by the checkpoint's own per-column statistics. A regression
  model answers with a number (``value``) instead of a label and probabilities.
* A language model (``head: "lm"``) answers ``POST /generate`` only (see ``generate_schemas``): every generation of
  a replica runs through ONE ``BatchedGenerator`` (one forward pass per step for all active sequences), stepped by
  a background asyncio task in a single worker thread, so forward passes never block the event loop; each request
  receives its tokens through its own asyncio.Queue, and a client that goes away cancels its sequence.
"""

import asyncio
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from modelworks.config import ServeConfig
from modelworks.serve import generate_schemas, http, schemas, v2_schemas
from modelworks.serve.config_builder import deployment_options
from modelworks.serve.generation_engine import GenerationEngine
from modelworks.serve.http import (api, error_response, error_responses, json_response, openapi_body, read_body,
                                    server_version)
from modelworks.serve.schemas import InputError
from modelworks.serve.served import Served, load_served

log = logging.getLogger("ray.serve")
DEPLOYMENT = "ModelServer"


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class ModelServer:
    def __init__(self, serve_config: dict):
        import torch

        torch.set_num_threads(1)  # replicas share small machines; batching, not intra-op threads, gives throughput
        self.cfg = ServeConfig(**serve_config)
        self.served: Served | None = None
        self.last_error: str | None = None
        self._registry: str | None = None
        self._poller: asyncio.Task | None = None
        self._swap_lock = asyncio.Lock()
        self._engine: GenerationEngine | None = None
        self._generate_thread: ThreadPoolExecutor | None = None
        self.infer_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)  # only overlapping requests batch
        self._in_flight = 0  # /predict and infer requests in this replica now (see _infer)

    # -- version management ---------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        ref = str(user_config["model"])
        registry = user_config.get("registry")
        async with self._swap_lock:
            try:
                new = await asyncio.to_thread(load_served, ref, registry, self.cfg)
            except Exception as err:  # noqa: BLE001
                self.last_error = f"{ref}: {err}"
                if self.served is None:
                    raise  # nothing to serve: fail the replica so Serve reports it
                log.error("modelworks: keeping %s@%s; cannot load %s", self.served.name, self.served.version, err)
                return
            self.served, self._registry, self.last_error = new, registry, None
        log.info("modelworks: serving %s@%s (from %s)", new.name, new.version, ref)
        if self._poller is None and self.cfg.alias_poll_s > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll_alias())

    async def _poll_alias(self) -> None:
        from modelworks.registry import Registry

        while True:
            await asyncio.sleep(self.cfg.alias_poll_s)
            cur = self.served
            if cur is None or cur.ref.partition("@")[2].isdigit():
                continue
            try:
                _, version = await asyncio.to_thread(Registry(self._registry).resolve, cur.ref)
                if version != cur.version:
                    await self.reconfigure({"model": cur.ref, "registry": self._registry})
            except Exception as err:  # noqa: BLE001 - a registry hiccup must not stop serving
                log.warning("modelworks: alias poll for %s failed: %s", cur.ref, err)

    def check_health(self) -> None:
        if self.served is None:
            raise RuntimeError(f"no model loaded ({self.last_error})")

    def replica_info(self) -> dict:
        """For operators and tests through a DeploymentHandle (not exposed over HTTP)."""
        s = self.served
        return {"pid": os.getpid(), "model": s.name if s else None, "version": s.version if s else None}

    def generation_info(self) -> dict:
        """The current generation engine's counters (sequences active now, steps, started, completed,
        cancelled, max_active), for operators and tests through a DeploymentHandle."""
        e = self._engine
        return {"active": e.active, **e.stats} if e else {"active": 0}

    # -- batching --------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def infer_batch(self, items: list[np.ndarray | list[str] | list[dict]]) -> list[tuple[Served, np.ndarray]]:
        """Class probabilities (N, C) per request, or a regression model's values (N, 1)."""
        served = self.served  # one model for the whole batch, even if a swap lands meanwhile
        sizes = [len(x) for x in items]
        if isinstance(items[0], list):  # texts or table rows: one list, preprocessed as one batch
            x = [row for rows in items for row in rows]
        else:
            x = items[0] if len(items) == 1 else np.concatenate(items)
        probs = served.model.predict_outputs(x).numpy()
        out, start = [], 0
        for n in sizes:
            out.append((served, probs[start:start + n]))
            start += n
        return out

    async def _infer(self, x: np.ndarray | list[str] | list[dict]) -> tuple[Served, np.ndarray]:
        # A request that finds no other in the replica runs at once, without the batcher: waiting out the batch
        # window would only add latency (nothing can join it), and the batcher's queue and task hand-offs cost
        # more than a small model's forward pass. It first yields once, so that requests that arrived with it
        # come in and it batches with them instead. Requests that overlap batch with the window, as under load.
        self._in_flight += 1
        try:
            if self._in_flight == 1:
                await asyncio.sleep(0)
                if self._in_flight == 1:
                    served = self.served
                    return served, self._checked(served.model.predict_outputs(x).numpy())
            async with asyncio.timeout(self.cfg.request_timeout_s):  # no extra task per request (wait_for makes one)
                served, probs = await self.infer_batch(x)
        except TimeoutError:
            raise InputError(503, "request", f"timed out after {self.cfg.request_timeout_s}s (server busy)",
                             "a retry later") from None
        finally:
            self._in_flight -= 1
        return served, self._checked(probs)

    @staticmethod
    def _checked(probs: np.ndarray) -> np.ndarray:
        ok = schemas.finite_rows(probs)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise InputError(422, f"inputs[{i}]", "values overflow the model (non-finite output)",
                             "inputs in the range the model was trained on")
        return probs

    def _ready(self) -> Served:
        if self.served is None:
            why = f" ({self.last_error})" if self.last_error else ""
            raise InputError(503, "model", f"is not loaded yet{why}", "a retry in a few seconds")
        return self.served

    # -- endpoints ---------------------------------------------------------------------------------------
    # Each route's OpenAPI entry lists every status it answers (error_responses; tests/test_serve_openapi.py fuzzes
    # the served document and fails on any other).
    @api.post("/predict", openapi_extra=openapi_body(schemas.PredictRequest),
              responses={200: {"model": schemas.PredictResponse}, **error_responses(400, 408, 413, 415, 422, 503)})
    async def predict(self, request: Request) -> Response:
        try:
            served = self._ready()
            if served.language_model:
                raise generate_schemas.wrong_endpoint(served.label, True, "/predict")
            body, raw, _ = await read_body(request, self.cfg.max_body_bytes)
            x = schemas.parse_predict(body, served.spec, raw)
            served, probs = await self._infer(x)
        except InputError as err:
            return error_response(err)
        if served.model.task == "regression":
            preds = [{"value": float(v), "model_version": served.version} for v in probs[:, 0]]
        else:
            names = served.class_names
            preds = [{"label": names[int(k)], "label_index": int(k),
                      "probabilities": dict(zip(names, map(float, row))), "model_version": served.version}
                     for k, row in zip(probs.argmax(axis=1), probs)]
        return json_response({"model": served.name, "model_version": served.version, "predictions": preds})

    # Language models ----------------------------------------------------------------------------------------
    def _engine_for(self, served: Served) -> GenerationEngine:
        """The engine of the model being served: a model swap starts a new one for new requests, while the
        old one finishes the generations it holds on the model they started with."""
        if self._engine is None or self._engine.served is not served:
            if self._generate_thread is None:
                self._generate_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mw-generate")
            self._engine = GenerationEngine(served, max(1, self.cfg.max_batch_size), self._generate_thread)
        return self._engine

    @api.post("/generate", openapi_extra=openapi_body(generate_schemas.GenerateRequest),
              responses={200: {"model": generate_schemas.GenerateResponse,
                               "content": {"text/plain": {"schema": {"type": "string"}}},
                               "description": "JSON; with stream, text/plain: the new characters, chunked as they "
                                              "are generated"},
                         **error_responses(400, 408, 413, 415, 422, 500, 503)})
    async def generate(self, request: Request) -> Response:
        try:
            served = self._ready()
            if not served.language_model:
                raise generate_schemas.wrong_endpoint(served.label, False, "/generate")
            body, _, _ = await read_body(request, self.cfg.max_body_bytes)
            params = generate_schemas.parse_generate(body, served.spec)
            ids = served.model.preprocessor.encode(params.prompt).tolist()
        except InputError as err:
            return error_response(err)
        engine = self._engine_for(served)
        decode = served.model.preprocessor.decode
        if params.stream:
            async def chunks():
                async for tokens in engine.stream(params, ids):
                    yield decode(tokens)

            return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8",
                                     headers={generate_schemas.MODEL_HEADER: served.label,
                                              "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out: list[int] = []
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                async for tokens in engine.stream(params, ids):
                    out += tokens
        except TimeoutError:
            return error_response(InputError(503, "request",
                                             f"timed out after {self.cfg.request_timeout_s}s (server busy)",
                                             "a retry later, fewer max_new_tokens, or stream=true"))
        except Exception as err:  # noqa: BLE001 - the model failed (inputs were checked): a server error, one line
            return json_response({"error": f"model: {err}", "field": "model", "expected": "a retry later",
                                  "status": 500}, 500)
        return json_response({"model": served.label, "prompt": params.prompt, "text": decode(out),
                              "tokens": len(out)})

    # 503 on every route: Ray Serve sheds any request when the queue is full.
    @api.get("/healthz", responses={200: {"model": http.Health}, **error_responses(503)})
    async def healthz(self) -> Response:
        return json_response({"status": "ok"})

    @api.get("/readyz", responses={200: {"model": http.Readiness}, **error_responses(503)})
    async def readyz(self) -> Response:
        try:
            s = self._ready()
        except InputError as err:
            return error_response(err)
        return json_response({"ready": True, "model": s.name, "model_version": s.version, "ref": s.ref,
                              "last_error": self.last_error})

    # Open Inference Protocol v2 (KServe / Triton REST) ---------------------------------------------------
    @api.get("/v2", responses={200: {"model": http.V2ServerMetadata}, **error_responses(503)})
    async def v2_server(self) -> Response:
        return json_response({"name": "modelworks", "version": server_version(),
                              "extensions": ["binary_tensor_data"]})

    @api.get("/v2/health/live", responses={200: {"model": http.V2Live}, **error_responses(503)})
    async def v2_live(self) -> Response:
        return json_response({"live": True})

    @api.get("/v2/health/ready", responses={200: {"model": http.V2Ready}, **error_responses(503)})
    async def v2_ready(self) -> Response:
        try:
            self._ready()
        except InputError as err:
            return error_response(err)
        return json_response({"ready": True})

    def _model(self, name: str, version: str | None = None) -> Served:
        s = self._ready()
        if name != s.name:
            raise InputError(404, "model_name", f"model {name!r} is not served here", f"{s.name!r}")
        if version is not None and version != str(s.version):
            raise InputError(404, "model_version", f"version {version!r} is not served here", f"{s.version!r}")
        return s

    @api.get("/v2/models/{name}", responses={200: {"model": http.V2ModelMetadata}, **error_responses(404, 503)})
    async def v2_metadata(self, name: str) -> Response:
        try:
            return json_response(v2_schemas.model_metadata(self._model(name)))
        except InputError as err:
            return error_response(err)

    @api.get("/v2/models/{name}/versions/{version}",
             responses={200: {"model": http.V2ModelMetadata}, **error_responses(404, 503)})
    async def v2_version_metadata(self, name: str, version: str) -> Response:
        try:
            return json_response(v2_schemas.model_metadata(self._model(name, version)))
        except InputError as err:
            return error_response(err)

    @api.get("/v2/models/{name}/ready", responses={200: {"model": http.V2ModelReady}, **error_responses(404, 503)})
    async def v2_model_ready(self, name: str) -> Response:
        try:
            s = self._model(name)
        except InputError as err:
            return error_response(err)
        return json_response({"name": s.name, "ready": True})

    async def _v2_infer(self, request: Request, name: str, version: str | None) -> Response:
        try:
            s = self._model(name, version)
            if s.language_model:
                raise generate_schemas.wrong_endpoint(s.label, True, "/v2/models/{name}/infer")
            body, raw, binary = await read_body(request, self.cfg.max_body_bytes, binary_ok=True)
            x, req_id, _ = v2_schemas.parse_v2_infer(body, s.spec, raw, binary)
            names = v2_schemas.v2_output_names(s.spec)
            plan = dict(v2_schemas.v2_outputs(body, names))  # output -> as binary data; answered in the order below
            s, probs = await self._infer(x)
        except InputError as err:
            return error_response(err)
        out = []
        for name in names:
            if name not in plan:
                continue
            as_binary = plan[name]
            if name in ("probabilities", "value"):  # class probabilities (N, C), or regression values (N, 1)
                out.append((name, "FP32", list(probs.shape), probs, as_binary))
            else:
                out.append((name, "BYTES", [len(probs)], [s.class_names[int(k)] for k in probs.argmax(axis=1)],
                            as_binary))
        content, header_len = v2_schemas.v2_response(s.name, str(s.version), req_id, out)
        if header_len is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={v2_schemas.V2_HEADER_LENGTH: str(header_len)})

    @api.post("/v2/models/{name}/infer", openapi_extra=openapi_body(v2_schemas.V2InferRequest),
              responses=http.V2_INFER_RESPONSES)
    async def v2_infer(self, name: str, request: Request) -> Response:
        return await self._v2_infer(request, name, None)

    @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=openapi_body(v2_schemas.V2InferRequest),
              responses=http.V2_INFER_RESPONSES)
    async def v2_version_infer(self, name: str, version: str, request: Request) -> Response:
        return await self._v2_infer(request, name, version)


# -- building the application ------------------------------------------------------------------------------
def code_version() -> str:
    """Same code -> same version, so a change of user_config alone is an in-place reconfigure."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return "mw-" + h.hexdigest()[:12]


def build(model: str, registry: str | None = None, serve_config: ServeConfig | dict | None = None,
          **overrides: Any):
    """The Serve application for ``model`` (``name``, ``name@3``, ``name@production``); ``overrides`` are
    extra ``Deployment.options`` (tests use them to force tiny queues)."""
    from modelworks.registry import default_root

    cfg = serve_config if isinstance(serve_config, ServeConfig) else ServeConfig(**(serve_config or {}))
    registry = registry or default_root()
    if "://" not in registry:
        registry = str(Path(registry).resolve())
    deployment = ModelServer.options(**{**deployment_options(cfg, model, registry), **overrides})
    # Serve gives imperatively deployed code a random version on every serve.run, which turns a model swap
    # into a rolling restart. Pinning the code version (what config-file deploys get from the import path)
    # makes a user_config-only change an in-place `reconfigure`. Private attribute: if a Ray upgrade drops
    # it, rollouts still work, as rolling restarts.
    if hasattr(deployment, "_version"):
        deployment._version = code_version()
    return deployment.bind(cfg.model_dump(mode="json"))


def build_app(args: dict):
    """Entry point for Serve config files (``import_path: modelworks.serve.app:build_app``)."""
    args = dict(args or {})
    if "model" not in args:
        raise ValueError("args.model is required (NAME, NAME@VERSION or NAME@ALIAS)")
    return build(str(args["model"]), args.get("registry"), args.get("serve") or {})
