"""Ray Train's start-up, which a run pays before its first step: the controller does not import torch
(LazyTorchConfig sets up the process group Ray's TorchConfig does), and the autoscaling coordinator the
controller waits for is started with Ray. bench/overhead.py measures the seconds."""
import json
import os
import pickle
import sys
from pathlib import Path

import pytest

from modelworks import ray_private
from modelworks.progress import EpochRecorded
from modelworks.torch_backend import LazyTorchConfig
from tests.fresh_python import run_python


def test_what_the_controller_unpickles_does_not_import_torch():
    """The controller process unpickles the backend config (inside Train's callbacks) and modelworks' own run
    callback, and instantiates the backend: none of it may import torch."""
    payload = pickle.dumps((LazyTorchConfig(backend="gloo"), EpochRecorded(board=None))).hex()
    code = ("import json, pickle, sys; config, callback = pickle.loads(bytes.fromhex(sys.argv[1])); "
            "backend = config.backend_cls(); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'backend': config.backend, "
            "'context': config.train_func_context.__name__, 'shares_gpus': backend.share_cuda_visible_devices}))")
    seen = run_python(code, payload)
    assert seen == {"torch": False, "backend": "gloo", "context": "_CudaDeviceSelected", "shares_gpus": True}


def test_modelworks_trainers_use_the_lazy_config_unless_given_one():
    from ray.train.torch import TorchConfig

    trainer_class = ray_private.torch_trainer_class()
    assert isinstance(trainer_class(_loop).backend_config, LazyTorchConfig)
    assert isinstance(trainer_class(_loop, torch_config=TorchConfig()).backend_config, TorchConfig)


def _loop(config):
    """Each rank all-reduces rank + 1; rank 0 also reads the controller's memory map (Linux /proc)."""
    import os

    import ray.train
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    total = torch.tensor([ctx.get_world_rank() + 1.0])
    dist.all_reduce(total)
    seen = {"rank": ctx.get_world_rank(), "world": ctx.get_world_size(), "sum": total.item(),
            "env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}}
    if ctx.get_world_rank() == 0:  # this Ray's controllers: started by the raylet that started this worker
        controllers = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::TrainController") and \
                        int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getppid():
                    controllers.append("libtorch" in Path(f"/proc/{pid}/maps").read_text())
            except OSError:
                continue
        seen["controllers_with_torch"] = controllers
    Path(config["out"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps(seen))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the controller's /proc memory map")
def test_two_workers_form_a_process_group_and_the_controller_never_loads_torch(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(_loop, train_loop_config={"out": str(tmp_path)}, torch_config=LazyTorchConfig(),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="lazy-torch", storage_path=str(tmp_path / "storage"))).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["sum"]) for r in ranks] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert [r["env"]["RANK"] for r in ranks] == ["0", "1"] and {r["env"]["WORLD_SIZE"] for r in ranks} == {"2"}
    assert ranks[0]["env"]["MASTER_PORT"] == ranks[1]["env"]["MASTER_PORT"]  # one rendezvous
    # found this run's controller (one of a run before may still be exiting), and none has libtorch mapped
    assert ranks[0]["controllers_with_torch"] and not any(ranks[0]["controllers_with_torch"])


def test_a_private_ray_starts_the_coordinator_train_waits_for(tmp_path):
    """ensure_ray starts the detached actor Train's controller gets or creates (and waits for) before it asks
    for workers, under the name and namespace Ray Data gives it, without waiting for its process."""
    code = ("import json; from modelworks import runtime; runtime.ensure_ray(num_cpus=2); import ray, sys; "
            "ray.get_actor('AutoscalingCoordinator', namespace='AutoscalingCoordinator'); "
            "print(json.dumps({'train': 'ray.train' in sys.modules, 'named': sorted((a['namespace'], a['name']) "
            "for a in ray.util.list_named_actors(all_namespaces=True))}))")
    seen = run_python(code, env={**os.environ, "MODELWORKS_JOIN_RAY": "0", "MODELWORKS_HOME": str(tmp_path)},
                      timeout=180)
    assert seen == {"train": False, "named": [["AutoscalingCoordinator", "AutoscalingCoordinator"]]}
