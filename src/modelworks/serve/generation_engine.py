"""The generations of one Serve replica (``POST /generate``), batched: no Ray and no HTTP here, only asyncio,
so it is read and tested on its own terms.

ONE ``models.generation.BatchedGenerator`` holds every active sequence (key/value cached) and makes one forward
pass per step for all of them; each request receives its tokens through its own ``asyncio.Queue``.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from modelworks.serve.generate_schemas import GenerateParams

log = logging.getLogger("ray.serve")


@dataclass(eq=False)
class _Sequence:
    """One /generate request inside a GenerationEngine: its tokens arrive on ``queue`` as (token, finished), or
    an exception."""
    params: GenerateParams
    ids: list[int]
    queue: asyncio.Queue
    handle: int | None = None
    cancelled: bool = False
    finished: bool = False


class GenerationEngine:
    """All generations of one replica for one loaded language model.

    ONE ``BatchedGenerator`` holds every active sequence (key/value cached) and makes one forward pass per step
    for all of them. A background asyncio task drives it: each round it hands the new requests, the
    cancellations and one ``step`` to a single worker thread (the generator is only ever touched from that
    thread, one call at a time, so it needs no lock and forward passes never block the event loop), then
    routes each new token to its request's asyncio.Queue. The task ends when nothing is left to do and starts
    again with the next request. At most ``max_batch`` sequences run at once; more wait their turn in order."""

    def __init__(self, served: Any, max_batch: int, executor: ThreadPoolExecutor):
        """``served``: the replica's loaded model (``served.Served``); its ``model.model`` is the CausalLM."""
        from modelworks.models.generation import BatchedGenerator

        self.served, self.max_batch, self.executor = served, max_batch, executor
        self._new_generator = lambda: BatchedGenerator(served.model.model, max_batch=max_batch)
        self.gen = self._new_generator()
        self.waiting: deque[_Sequence] = deque()
        self.running: dict[int, _Sequence] = {}
        self.cancels: list[int] = []
        self.task: asyncio.Task | None = None
        self.stats = {"steps": 0, "started": 0, "completed": 0, "cancelled": 0, "max_active": 0}

    @property
    def active(self) -> int:
        return len(self.running) + len(self.waiting)

    # -- the request side (event loop) ---------------------------------------------------------------
    async def stream(self, params: GenerateParams, ids: list[int]) -> AsyncIterator[list[int]]:
        """New token ids as they are produced: each item holds those that arrived since the last one. Leaving
        early (the client went away: cancelled, closed) cancels the sequence."""
        seq = _Sequence(params, ids, asyncio.Queue())
        self.waiting.append(seq)
        self.stats["started"] += 1
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
        try:
            while not seq.finished:
                items = [await seq.queue.get()]
                while not seq.queue.empty():
                    items.append(seq.queue.get_nowait())
                tokens = []
                for item in items:
                    if isinstance(item, BaseException):
                        seq.cancelled = True  # failed: nothing left to cancel
                        raise item
                    tokens.append(item[0])
                    seq.finished = seq.finished or item[1]
                yield tokens
        finally:
            if seq.finished:
                self.stats["completed"] += 1
            elif not seq.cancelled:
                self._cancel(seq)

    def _cancel(self, seq: _Sequence) -> None:
        seq.cancelled = True
        self.stats["cancelled"] += 1
        if seq.handle is None:
            try:
                self.waiting.remove(seq)  # not handed to the generator yet
            except ValueError:
                pass                      # being added right now: cancelled when its handle comes back
        elif self.running.pop(seq.handle, None) is not None:
            self.cancels.append(seq.handle)

    # -- the driver (one background task) and the worker thread ---------------------------------------
    def _tick(self, adds: list[_Sequence], cancels: list[int]) -> tuple[list[int | Exception], list]:
        """In the worker thread: cancel, add, then one step for every active sequence."""
        import torch

        with torch.no_grad():
            for handle in cancels:
                try:
                    self.gen.cancel(handle)
                except Exception:  # noqa: BLE001 - finished meanwhile: nothing to cancel
                    pass
            handles: list[int | Exception] = []
            for seq in adds:
                p = seq.params
                try:
                    handles.append(self.gen.add(seq.ids, p.max_new_tokens, temperature=p.temperature, top_k=p.top_k,
                                                random_seed=p.seed))
                except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                    handles.append(err)
            return handles, (self.gen.step() if self.gen.active else [])

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.waiting or self.running or self.cancels:
                adds = []
                while self.waiting and len(self.running) + len(adds) < self.max_batch:
                    adds.append(self.waiting.popleft())
                cancels, self.cancels = self.cancels, []
                try:
                    handles, results = await loop.run_in_executor(self.executor, self._tick, adds, cancels)
                except Exception as err:  # noqa: BLE001 - fail the requests in flight, keep the replica serving
                    log.exception("modelworks: generation step failed")
                    failed = RuntimeError(f"generation failed ({type(err).__name__}: {err})")
                    for seq in [*adds, *self.running.values()]:
                        seq.queue.put_nowait(failed)
                    self.running.clear()
                    self.gen = self._new_generator()  # its state is unknown now: start clean
                    continue
                self.stats["steps"] += 1
                for seq, handle in zip(adds, handles):
                    if isinstance(handle, Exception):
                        seq.queue.put_nowait(handle)
                        continue
                    seq.handle = handle
                    if seq.cancelled:
                        self.cancels.append(handle)
                    else:
                        self.running[handle] = seq
                self.stats["max_active"] = max(self.stats["max_active"], len(self.running))
                for handle, token, finished in results:
                    seq = self.running.get(handle)
                    if seq is None:
                        continue  # cancelled while this step ran
                    seq.queue.put_nowait((int(token), bool(finished)))
                    if finished:
                        del self.running[handle]
        finally:
            self.task = None
