"""Where the rollout engines run: one placement group per engine on GPUs, nothing reserved on CPU.

    plans = engine_plans(cfg)              # pure: what each engine asks Ray and vLLM for (unit-tested)
    pgs = reserve(plans, cfg.placement)    # the placement groups, ready, or a one-line error naming the engine

On GPUs an engine with tensor_parallel_size = t gets a placement group of t bundles of one GPU each,
STRICT_PACK, so its tensor-parallel all-reduces stay inside one node. With t = 1 the engine's Ray actor
takes the bundle's GPU itself. With t > 1 the actor takes nothing (num_gpus=0) and vLLM's Ray executor
starts the t GPU workers inside the same placement group: the actor captures child tasks, vLLM reads the
current placement group (and passes it to its engine-core process), and VLLM_RAY_BUNDLE_INDICES pins
worker k to bundle k. This is the pattern of vLLM's own RLHF example, and what OpenRLHF does.

On CPU an engine reserves nothing: it shares the node's cores with the trainers, which are idle while it
generates, and binds its OpenMP threads itself (workers/rollout.py). A CPU engine with t = 1 runs inside
its Ray actor's process (INLINE_ENGINE): vLLM's default would start an engine-core process and a worker
process under it, each importing vLLM and torch again (~20 s of a 36 s engine start on 2 cores, measured)
for no gain, since on CPU scheduling and the forward pass share the same cores anyway. A CPU engine with
t > 1 uses vLLM's multiprocessing executor on its node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from rlhf_system.distributed.devices import CPU_ONLY_ENV, on_gpu

# vLLM's in-process engine: the uniprocess executor (no worker process), no engine-core process
INLINE_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@dataclass
class EnginePlan:
    index: int
    bundles: list[dict[str, float]]            # its placement group ([] on CPU: none)
    actor: dict[str, float]                    # the engine actor's own num_cpus / num_gpus
    executor: str | None = None                # vLLM distributed_executor_backend (None: vLLM's default)
    env: dict[str, str] = field(default_factory=dict)  # set in the engine's process before vLLM starts
    strategy: str = "STRICT_PACK"
    colocated_bundle: int | None = None        # hybrid engine: its first bundle in the actor's placement group


def inline_engine(cfg) -> bool:
    """Whether a CPU engine runs vLLM in its actor's process (INLINE_ENGINE, executor "uni"): with one
    tensor-parallel worker, unless rollout.cpu_bind=vllm keeps vLLM's own processes (only its
    multiprocessing executor applies its own thread binding)."""
    return not on_gpu(cfg.placement) and cfg.rollout.tensor_parallel_size == 1 and cfg.rollout.cpu_bind != "vllm"


def colocated_share(cfg) -> int:
    """How many roles share each bundle of the colocate group that holds the rollout engines (0: none)."""
    for group in cfg.placement.colocate:
        if "rollout" in group:
            from rlhf_system.config_checks import roles_for

            return len([r for r in group if r in roles_for(cfg)])
    return 0


def engine_plans(cfg) -> list[EnginePlan]:
    r, p = cfg.rollout, cfg.placement
    tp = r.tensor_parallel_size
    if colocated_share(cfg):
        return _colocated_plans(cfg)
    if not on_gpu(p):
        # GPUs hidden (devices.py): on a CUDA host vLLM would otherwise take cuda:0 for a CPU placement.
        inline = inline_engine(cfg)
        return [EnginePlan(i, [], {"num_cpus": 0, "num_gpus": 0}, "uni" if inline else "mp",
                           CPU_ONLY_ENV | (INLINE_ENGINE if inline else {})) for i in range(r.num_engines)]
    bundle = {"GPU": 1.0, "CPU": float(p.cpus_per_worker)}
    if tp == 1:
        return [EnginePlan(i, [dict(bundle)], {"num_cpus": bundle["CPU"], "num_gpus": 1.0})
                for i in range(r.num_engines)]
    env = {"VLLM_RAY_BUNDLE_INDICES": ",".join(str(k) for k in range(tp)), "VLLM_RAY_PER_WORKER_GPUS": "1"}
    return [EnginePlan(i, [dict(bundle) for _ in range(tp)], {"num_cpus": 0, "num_gpus": 0}, "ray", dict(env))
            for i in range(r.num_engines)]


def _colocated_plans(cfg) -> list[EnginePlan]:
    """The hybrid engine: engine i's workers sit on bundles i*tp .. i*tp+tp-1 of the actor's placement group,
    each taking the bundle's GPU share (1 / the roles sharing it), the same devices as actor ranks i*tp..
    (weight_sync maps actor rank j's buckets into engine worker j). Nothing is reserved apart."""
    r, p = cfg.rollout, cfg.placement
    tp, gpu = r.tensor_parallel_size, on_gpu(p)
    frac = 1.0 / colocated_share(cfg) if gpu else 0.0
    plans = []
    for i in range(r.num_engines):
        env = {} if gpu else dict(CPU_ONLY_ENV)
        if tp == 1:
            inline = inline_engine(cfg)
            plans.append(EnginePlan(i, [], {"num_cpus": 0, "num_gpus": frac}, "uni" if inline else None,
                                    env | (INLINE_ENGINE if inline else {}), colocated_bundle=i))
            continue
        if gpu:  # vLLM's Ray workers on this engine's bundles of the shared group, each with the share
            env |= {"VLLM_RAY_BUNDLE_INDICES": ",".join(str(i * tp + k) for k in range(tp)),
                    "VLLM_RAY_PER_WORKER_GPUS": f"{frac:g}"}
        plans.append(EnginePlan(i, [], {"num_cpus": 0, "num_gpus": 0}, "ray" if gpu else "mp", env,
                                colocated_bundle=i * tp))
    return plans


def check_cluster(plans: list[EnginePlan], nodes: list[dict[str, float]]) -> None:
    """A ConfigError now, naming the setting, when these nodes (each one's resources) cannot hold the
    engines: too few GPUs in all, or no node with an engine's tensor-parallel GPUs. Ray would otherwise
    leave a placement group pending until placement.timeout_s."""
    from rlhf_system.config import ConfigError

    sized = [pl for pl in plans if pl.bundles]
    if not sized:
        return
    need, tp = sum(b["GPU"] for pl in sized for b in pl.bundles), len(sized[0].bundles)
    have, most = sum(n.get("GPU", 0) for n in nodes), max((n.get("GPU", 0) for n in nodes), default=0)
    if need > have:
        raise ConfigError(f"placement: the rollout engines need {need:g} GPUs (rollout.num_engines={len(sized)} x "
                          f"rollout.tensor_parallel_size={tp}) but the Ray cluster has {have:g}. Fix: fewer engines, "
                          "a smaller tensor_parallel_size, or more nodes")
    if tp > most:
        raise ConfigError(f"placement: a rollout engine with rollout.tensor_parallel_size={tp} needs {tp} GPUs on one "
                          f"node, and the largest node has {most:g}. Fix: rollout.tensor_parallel_size<={most:g}")


def reserve(plans: list[EnginePlan], placement) -> list:
    """A ready placement group per plan with bundles (None for CPU plans). The cluster is checked first,
    so an impossible request fails at once; a group not ready within placement.timeout_s is removed and
    the engine named. Whatever was made is removed on failure."""
    import ray
    from ray.util.placement_group import placement_group

    from rlhf_system.placement.group import GroupCallError

    check_cluster(plans, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    pgs: list = []
    try:
        for plan in plans:
            pg = (placement_group(plan.bundles, strategy=plan.strategy, name=f"engine{plan.index}-{os.getpid()}")
                  if plan.bundles else None)
            pgs.append(pg)
            if pg is None:
                continue
            try:
                ray.get(pg.ready(), timeout=placement.timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise GroupCallError(f"rollout engine {plan.index}: placement group {plan.bundles} ({plan.strategy}) "
                                     f"not ready within {placement.timeout_s:g}s; the cluster cannot place it") from None
    except BaseException:
        release(pgs)
        raise
    return pgs


def release(pgs: list) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in pgs:
        if pg is not None:
            remove_placement_group(pg)


def actor_options(plan: EnginePlan, pg) -> dict:
    """Ray options of the engine actor: its own resources, inside its placement group (bundle 0, or its
    bundle of the actor's group when colocated), capturing child tasks so vLLM's Ray workers land in the
    same group."""
    opts: dict = dict(plan.actor)
    if plan.env:  # from the process's start, before anything in it can look at the devices
        opts["runtime_env"] = {"env_vars": dict(plan.env)}
    if pg is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=plan.colocated_bundle or 0,
            placement_group_capture_child_tasks=True)
    return opts
