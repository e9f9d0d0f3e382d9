"""Resources: how many trials run at once, on how many CPUs each, with how many torch threads."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from modelworks.config import WorkflowConfig
from modelworks.errors import UserError
from modelworks.tune.space import possible_values


@dataclass
class TrialPlan:
    total_cpus: float
    workers: int              # training workers per trial (the largest a trial may ask for)
    cpus_per_worker: float
    trial_cpus: float         # what one trial holds in all
    concurrency: int
    threads: int              # torch threads per worker
    why: str = ""             # what set the concurrency (logged with the plan)

    def describe(self) -> str:
        return (f"{self.concurrency} concurrent trial(s) x {self.workers} worker(s) x {self.cpus_per_worker:g} CPU "
                f"on {self.total_cpus:g} CPUs ({_data_cpus():g} kept for Ray Data), {self.threads} torch thread(s)"
                + (f"; {self.why}" if self.why else ""))


def _data_cpus() -> float:
    from modelworks.train import DATA_CPUS

    return DATA_CPUS


# The trial actor of a multi-worker trial only waits on its TorchTrainer: a sliver of a CPU
# (0 is refused by Tune: "empty head").
DRIVER_CPUS = 0.01
# The smallest CPU share a training worker may ask for (below it a time-sliced trial crawls).
MIN_WORKER_CPUS = 0.1
# Memory of one training process besides its data: Python + torch + Ray worker (~0.5 GB RSS; rounded up).
PROCESS_BYTES = 700 * 2**20


def trial_memory_bytes(workers: int, data_bytes: int) -> int:
    """Rough peak memory of one trial: a process per worker plus 4x the data it reads: the object-store pages
    it maps, the batches, and (``cache_on_worker``) its shard as tensors, briefly twice while concatenating.
    Measured: an MNIST trial actor (190 MB of preprocessed train+val) peaks at ~1.44 GB RSS; this gives 1.45."""
    return workers * PROCESS_BYTES + 4 * int(data_bytes)


def _floor4(x: float) -> float:
    """Round a CPU share down to Ray's resource granularity, so `concurrency` shares never exceed the budget."""
    return math.floor(x * 10_000 + 1e-6) / 10_000


def plan_trials(cfg: WorkflowConfig, resources: dict[str, float] | None = None,
                physical_cpus: int | None = None, local: bool = True,
                trial_bytes: int | None = None) -> TrialPlan:
    """Per-trial resources and concurrency from the cluster's resources, always leaving DATA_CPUS free.

    Concurrency (1-worker trials): ASHA needs peers at a rung. It stops a trial that reports below the
    (1 - 1/reduction_factor) quantile of the results *already recorded* at that rung, and the first trial to
    reach a rung always continues. Run one at a time (what whole CPUs allow on a 2-core machine), every trial
    is judged only against its predecessors, the first (often poor) one sets the bar at every rung and nearly
    all later ones clear it (measured: 142 of 160 epochs used on digits). So by default *all* trials run
    together, each on a fractional share of the free CPUs with 1 torch thread (the OS time-slices them; total
    compute is the same), and they reach each rung at about the same time, as ASHA assumes. The cap:
    search.max_concurrent (override), the CPUs (>= MIN_WORKER_CPUS each, or search.cpus_per_trial each) and
    memory (``trial_bytes`` per trial, see trial_memory_bytes, against the cluster's ``memory`` resource).

    Multi-worker trials keep whole-CPU budgeting: their DDP workers synchronise every step, and time-slicing
    several worker groups on the same cores would stall every all-reduce on a descheduled rank.

    Raises UserError at once when a trial could never be scheduled (instead of Tune waiting forever).
    """
    import ray

    res = resources if resources is not None else ray.cluster_resources()
    total = float(res.get("CPU", 0.0))
    free = total - _data_cpus()
    workers = max(int(w) for w in possible_values(cfg, "train.workers"))
    use_gpu = any(bool(g) for g in possible_values(cfg, "train.use_gpu"))
    s = cfg.search
    if free <= 0:
        raise UserError(f"the Ray cluster has {total:g} CPUs; a search needs more than {_data_cpus():g} "
                        f"(kept for Ray Data): start Ray with more CPUs")
    if use_gpu and res.get("GPU", 0.0) < workers:
        raise UserError(f"a trial asks for {workers} GPU worker(s) but the cluster has {res.get('GPU', 0.0):g} GPUs; "
                        f"set train.use_gpu=false or add GPUs")
    mem_cap = None
    if trial_bytes and res.get("memory"):
        mem_cap = max(1, int(res["memory"] // trial_bytes))
    caps = {"trials": s.num_samples}
    if s.max_concurrent:
        caps["search.max_concurrent"] = s.max_concurrent
    if mem_cap is not None:
        caps[f"memory ({res['memory'] / 2**30:.1f} GiB / {trial_bytes / 2**30:.2f} GiB per trial)"] = mem_cap
    if workers == 1 and not s.cpus_per_trial:
        caps[f"CPUs (>= {MIN_WORKER_CPUS:g} each)"] = max(1, int(math.floor(free / MIN_WORKER_CPUS + 1e-9)))
        concurrency = min(caps.values())
        # A fractional share when the trials outnumber the free CPUs; never more than 1 CPU by default, so a
        # trial fits on any node (search.cpus_per_trial asks for more).
        per_worker = _floor4(min(1.0, free / concurrency))
        need = per_worker
    else:
        if workers == 1:
            per_worker = s.cpus_per_trial
            need = per_worker
        else:
            per_worker = (s.cpus_per_trial / workers) if s.cpus_per_trial else \
                _floor4(min(1.0, (free - DRIVER_CPUS) / workers))
            need = per_worker * workers + DRIVER_CPUS
        if need > free + 1e-9 or per_worker < MIN_WORKER_CPUS - 1e-9:
            raise UserError(f"a trial asks for {workers} worker(s) x {per_worker:.2g} CPU (+ driver) = {need:.3g} "
                            f"CPUs, but the cluster has {total:g} CPUs with {_data_cpus():g} kept for Ray Data, so "
                            f"it could never start; lower train.workers / search.cpus_per_trial or add CPUs")
        caps["CPUs"] = max(1, int(math.floor(free / need + 1e-9)))
        concurrency = min(caps.values())
    physical = physical_cpus or os.cpu_count() or 1
    threads = max(1, physical // (concurrency * workers)) if local else max(1, int(per_worker))
    limit = min(caps, key=lambda k: caps[k])
    why = f"concurrency limited by {limit}"
    if concurrency < s.num_samples and s.scheduler == "asha":
        why += " (fewer concurrent trials than samples: ASHA judges later trials against earlier ones only)"
    return TrialPlan(total, workers, round(per_worker, 4), round(need, 4), concurrency, threads, why)
