"""Live training progress, from rank 0 of a training step to the driver's console.

    worker (rank 0)  --push(event), fire and forget-->  ProgressBoard actor  <--take() every 0.25 s--  driver

Events are small dicts with a ``kind``:
- ``start``: the worker group (re)started the step: ``step``, ``epochs``, ``first_epoch`` (>1 when it
  resumed from a checkpoint), ``batches`` per epoch, ``unit`` (samples or tokens), ``steps`` (a model
  trained by optimizer steps: the total; its epochs are then evaluation rounds of ``batches`` steps);
- ``batch``: inside an epoch, at most every ``BATCH_EVERY_S``: ``epoch``, ``batch``, ``rate``, ``loss``;
- ``epoch``: an epoch's metrics as ``ray.train.report`` gets them, sent by Ray Train's controller once it has
  recorded the epoch's checkpoint (``EpochRecorded``).

A worker never waits on the driver: a push is one actor call whose result nobody reads, and a lost event
only costs a line of output. The board lives in the driver's job, on the driver's node, so a worker group
that dies and restarts (``FailureConfig``) keeps pushing to the same board; its second ``start`` is how the
console learns of it.
"""
from __future__ import annotations

import threading
import traceback
import time
from typing import Callable

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from modelworks.progress_board import ProgressBoard

# Often enough for a progress bar to move smoothly, rarely enough that the calls cost nothing measurable.
BATCH_EVERY_S = 0.5


class WorkerProgress:
    """The worker side. Only rank 0 pushes; without a board (tests, search trials) every call is a no-op."""

    def __init__(self, board, rank: int, step: str) -> None:
        self._board = board if rank == 0 else None
        self._step = step
        self._last = 0.0

    def _push(self, **event) -> None:
        if self._board is not None:
            self._board.push.remote({"step": self._step, **event})  # Ray: fire and forget

    def start(self, epochs: int, first_epoch: int, batches: int | None, unit: str = "samples",
              steps: int | None = None) -> None:
        """``steps``: training counted in optimizer steps (a language model); its "epochs" are then the
        evaluation rounds of ``batches`` steps each."""
        self._push(kind="start", epochs=epochs, first_epoch=first_epoch, batches=batches, unit=unit, steps=steps)

    def batch(self, epoch: int, batch: int, rate: float, loss: float) -> None:
        now = time.monotonic()
        if now - self._last >= BATCH_EVERY_S:
            self._last = now
            self._push(kind="batch", epoch=epoch, batch=batch, rate=rate, loss=loss)


class EpochRecorded(ray.train.UserCallback):
    """The ``epoch`` event, sent from Ray Train's controller once it has recorded an epoch's report and
    checkpoint: an epoch line on the console means the epoch is saved. (Sent by the worker before its
    checkpoint was recorded, a line could show for an epoch that a lost node then made the run train
    again.)"""

    def __init__(self, board) -> None:
        self.board = board

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        event = {"kind": "epoch", **{k: v for k, v in metrics[0].items() if k != "history"}}
        try:  # waited for, so the last epoch's event is on the board before fit() returns to the driver
            ray.get(self.board.push.remote(event), timeout=10)  # Ray
        except Exception:  # noqa: BLE001 - progress is best effort; training must not fail over a console line
            pass


class FollowProgress:
    """Driver side: a board for the duration of a blocking call (``trainer.fit()``), polled from a thread
    that hands every event to ``on_event``.

        with console.training(label, max_attempts) as on_event, FollowProgress(on_event) as board:
            run_trainer(..., progress=board)
    """

    def __init__(self, on_event: Callable[[dict], None], interval_s: float = 0.25) -> None:
        self._on_event = on_event
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.board = None

    def _drain(self) -> None:
        for event in ray.get(self.board.take.remote()):  # Ray
            try:
                self._on_event(event)
            except Exception:  # noqa: BLE001 - one event the console could not show must not stop the rest
                traceback.print_exc()

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._drain()
            except ray.exceptions.ActorDiedError:  # the board is gone (its node with it): nothing more to show
                return
            except Exception:  # noqa: BLE001 - progress is best effort: say why in the log, try again next time
                traceback.print_exc()

    def __enter__(self):
        # Ray: on the driver's own node. Anywhere else, losing that node would silence the console for the
        # rest of the run, though training resumes on the nodes left.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ProgressBoard.options(scheduling_strategy=here).remote()
        self._thread = threading.Thread(target=self._poll, name="modelworks-progress", daemon=True)
        self._thread.start()
        return self.board

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._drain()  # the last epoch's event may have arrived after the last poll
        except Exception:  # noqa: BLE001
            pass
        ray.kill(self.board)  # Ray
