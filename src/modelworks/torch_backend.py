"""PyTorch's process group for Ray Train, configured from a module that does not import torch.

Ray Train's controller is a process of its own that unpickles the trainer's backend config. Ray's
``TorchConfig`` lives in ``ray.train.torch.config``, which imports torch at its top: on a 2-core machine
that is 1.5-3 s of every run's start-up, spent before the controller asks for its workers, by a process
that never touches a tensor. ``LazyTorchConfig`` sets up the same process group as TorchConfig does for
one process per CPU share or GPU:

- gloo on CPUs, NCCL on GPUs (TorchTrainer fills ``backend`` in from ``use_gpu``, as it does for its own);
- rendezvous ``env://`` at rank 0's node address and a free port there (MASTER_ADDR, MASTER_PORT), with
  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and NODE_RANK set from Ray Train's context first;
- each worker's CUDA device selected around the training function, and the group destroyed at the end.

Only the functions that run in the workers import torch (the workers have it loaded anyway). Ray APIs
used: ``ray.train.backend.Backend`` / ``BackendConfig`` (DeveloperAPI) and the worker group's
``execute`` / ``execute_single`` / ``execute_single_async``, called as Ray's own backends call them.
Pinned by tests/test_train_startup.py (no torch in a process that unpickles the config or in a real run's
controller; an all-reduce over 2 workers); DDP runs in tests/test_train_e2e.py and tests/test_text_workflow.py.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import ray
import ray.train
from ray.train.backend import Backend, BackendConfig

# What Ray waits for the workers to leave the process group at the end (Ray's own default, 30 s).
SHUTDOWN_TIMEOUT_S = 30


# -- run in the workers --------------------------------------------------------------------------------------

def _address_and_free_port() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def _set_rendezvous_env(addr: str, port: int) -> None:
    ctx = ray.train.get_context()
    os.environ.update({
        "MASTER_ADDR": addr, "MASTER_PORT": str(port),
        "RANK": str(ctx.get_world_rank()), "WORLD_SIZE": str(ctx.get_world_size()),
        "LOCAL_RANK": str(ctx.get_local_rank()), "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
        "NODE_RANK": str(ctx.get_node_rank()),
    })


def _init_process_group(backend: str, timeout_s: int) -> None:
    import torch.distributed as dist

    if backend == "nccl":  # fail a hung collective instead of waiting forever (Ray sets the same)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend=backend, init_method="env://", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))


def _leave_process_group(destroy: bool) -> None:
    import torch
    import torch.distributed as dist

    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _CudaDeviceSelected:
    """Around the training function: this worker's GPU is the current CUDA device (as Ray's TorchConfig)."""

    def __enter__(self):
        import ray.train.torch
        import torch

        if torch.cuda.is_available():
            device = ray.train.torch.get_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)

    def __exit__(self, *exc) -> bool:
        return False


# -- run in the controller ------------------------------------------------------------------------------------

class _TorchProcessGroup(Backend):
    share_cuda_visible_devices: bool = True  # each worker sees every GPU of its node, as with TorchConfig

    def on_start(self, worker_group, backend_config: "LazyTorchConfig") -> None:
        addr, port = worker_group.execute_single(0, _address_and_free_port)
        worker_group.execute(_set_rendezvous_env, addr, port)
        ray.get([worker_group.execute_single_async(rank, _init_process_group, backend_config.backend or "gloo",
                                                   backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: "LazyTorchConfig") -> None:
        try:
            ray.get(worker_group.execute_async(_leave_process_group, len(worker_group) > 1),
                    timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            pass  # a worker stuck in a collective: Ray Train kills the worker group next


@dataclass
class LazyTorchConfig(BackendConfig):
    """TorchConfig's process group, no torch here; ``ray_private.torch_trainer_class`` uses it by default."""

    backend: Optional[str] = None  # None: TorchTrainer picks nccl with GPUs, gloo without
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _TorchProcessGroup

    @property
    def train_func_context(self):
        return _CudaDeviceSelected
