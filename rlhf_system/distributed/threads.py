"""How many CPU threads each process computes with, decided from the placement.

Why this exists: Ray sets OMP_NUM_THREADS from an actor's `num_cpus` (1 by default), so a trainer
worker ran torch on one thread of a 2-core machine, and vLLM's CPU engine reserved one core for its
scheduler and bound its OpenMP threads to the rest (one core of two). Nobody should have to remember
a flag for this, so the numbers come from the placement:

- CPU-only placement (placement.gpus_per_node == 0): the roles take turns on the node (the PPO
  controller runs one role's phase at a time there, trainers/ppo.py), so each worker gets all of
  its node's cores, divided among the ranks of its OWN role on that node (data-parallel ranks do run
  at the same time).
- GPU placement: a worker owns a GPU and the CPUs of its bundle (placement.cpus_per_worker, divided
  among colocated roles); it runs that many threads.
- vLLM on CPU: the engines on a node split the node's cores between them, and an engine's cores are
  split again between its tensor-parallel workers; nothing is reserved (vLLM's default reserves a
  core for the scheduler loop, which on 2 cores halves generation speed, measured).

- Disjoint cores (placement.cpu_split; by default when train.max_staleness > 0, i.e. when generation
  runs beside training): the engines get placement.engine_core_share of a node's cores and the trainer
  workers the rest (`split_cores`), each pinned there. Sharing every core, the two phases would slow
  each other down (threads of both time-slicing on the same cores) rather than overlap.

Overrides: placement.threads_per_worker (every trainer worker), rollout.cpu_bind (the engines: a
core list such as "0-7", "|"-separated per tensor-parallel worker, or "vllm" for vLLM's own choice).
"""

from __future__ import annotations

import os


def node_cores() -> list[int]:
    """The cores this process may run on, capped by a cgroup CPU quota (containers, Kubernetes limits):
    affinity alone shows every host core to a pod limited to a few."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    quota = _cgroup_quota()
    return cores[:max(1, quota)] if quota else cores


def _cgroup_quota() -> int | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if quota == "max" else max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def split_cores(cores: list[int], engine_share: float) -> tuple[list[int], list[int]]:
    """(engine cores, trainer cores): a node's cores cut at `engine_share`, at least one each side; a
    one-core node cannot be split, so both get its core."""
    if len(cores) < 2:
        return cores, cores
    k = min(len(cores) - 1, max(1, round(len(cores) * engine_share)))
    return cores[:k], cores[k:]


def pin(cores: list[int]) -> None:
    """Run this process on `cores` only: every thread it has (Linux pins per thread, and a thread
    pool started earlier would stay everywhere) and, by inheritance, every thread it starts later."""
    if not hasattr(os, "sched_setaffinity"):
        return
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # a thread that ended meanwhile
            pass


def trainer_threads(override: int, gpus_per_node: int, cpus_per_worker: float, share: int,
                    ranks_on_node: int, cores: int) -> int:
    """Threads for one trainer worker (see the module docstring for the rules)."""
    if override > 0:
        return override
    if gpus_per_node > 0:
        return max(1, int(cpus_per_worker / share))
    return max(1, cores // max(1, ranks_on_node))


def set_threads(n: int) -> int:
    """Use `n` threads in this process (torch intra-op, and OpenMP for anything started later);
    returns what torch now reports."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return torch.get_num_threads()


def parse_cores(bind: str) -> list[int]:
    """The cores of a VLLM_CPU_OMP_THREADS_BIND string ("0-3,6", "|" between tensor-parallel workers)."""
    cores: list[int] = []
    for part in bind.replace("|", ",").split(","):
        lo, _, hi = part.strip().partition("-")
        if lo:
            cores.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(cores))


def engine_cpu_bind(cores: list[int], index: int, engines_on_node: int, tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for engine `index` of `engines_on_node` sharing `cores`: a contiguous
    slice each (at least one core), then split between its `tp` workers ("0-3|4-7")."""
    k = max(1, len(cores) // max(1, engines_on_node))
    mine = cores[(index % max(1, engines_on_node)) * k:][:k] or cores[-1:]
    per = max(1, len(mine) // tp)
    parts = [mine[i * per:(i + 1) * per] or mine[-1:] for i in range(tp)]
    return "|".join(",".join(str(c) for c in p) for p in parts)


def bind_engine(bind: str, inline: bool) -> None:
    """Bind a CPU vLLM engine to `bind` (a VLLM_CPU_OMP_THREADS_BIND string), reserving no core. An inline
    engine (uniprocess executor) computes in this process, and only vLLM's multiprocessing executor
    applies the bind to the workers it spawns; vLLM then disables torch.set_num_threads here. So an
    inline engine's process takes its cores and thread count itself, before vLLM starts."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if inline:
        mine = parse_cores(bind)
        pin(mine)
        set_threads(len(mine))
