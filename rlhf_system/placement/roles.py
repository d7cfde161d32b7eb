"""Where the PPO roles run: one placement group per role, or shared ones for colocated roles.

    groups = start_roles(cfg, {"actor": ActorWorker, "critic": CriticWorker, ...})

By default each role gets its own placement group (bundles of one GPU, or one CPU slot, per worker;
`placement.strategy` PACK or SPREAD across nodes). `placement.colocate` lists groups of roles that
share GPUs, e.g. [[actor, reference], [critic, reward]]: such a group gets ONE placement group and
each of its roles puts worker i on bundle i with 1/k of the bundle's GPU and CPUs (k roles). Roles
that take turns (reference inference, then actor training) then share memory instead of each
needing its own device.

The hybrid engine: with rollout in the actor's colocate group (e.g. [[actor, rollout]]) the engines take
a share of the actor group's bundles (placement/engines.py) and sleep while the trainers run
(distributed/weight_sync.py). Otherwise the rollout engines get their own GPUs (or, on CPU, no
reserved slot at all).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from rlhf_system.config import RunConfig
from rlhf_system.config_checks import role_slots, roles_for
from rlhf_system.placement.group import GroupCallError, WorkerGroup, bundles_for, check_resources, ensure_ray


def cpus_needed(cfg: RunConfig, roles: list[str]) -> int:
    """CPU slots the trainer roles reserve, counting a colocated group once."""
    counted: set[str] = set()
    need = 0.0
    for group in cfg.placement.colocate:
        active = [r for r in group if r in roles and r != "rollout"]
        if active:
            need += max(role_slots(cfg, r) for r in active) * cfg.placement.cpus_per_worker
            counted.update(active)
    need += sum(role_slots(cfg, r) * cfg.placement.cpus_per_worker for r in roles
                if r not in counted and r != "rollout")
    return int(need + 0.999)


def _shared_group(cfg: RunConfig, roles: list[str], name: str):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    n = max(role_slots(cfg, r) for r in roles)
    bundles = bundles_for(cfg.placement, n)
    check_resources("+".join(roles), bundles, cfg.placement.strategy)
    pg = placement_group(bundles, strategy=cfg.placement.strategy, name=f"{name}-{os.getpid()}")
    try:
        ray.get(pg.ready(), timeout=cfg.placement.timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise GroupCallError(f"{'+'.join(roles)}: placement group {bundles} not ready within "
                             f"{cfg.placement.timeout_s:g}s; the cluster cannot place it") from None
    return pg


def start_roles(cfg: RunConfig, classes: dict[str, type]) -> tuple[dict[str, WorkerGroup], list]:
    """A WorkerGroup per role in `classes` (rollout excluded); returns (groups, shared placement groups).
    On failure, whatever was started is shut down before the error propagates."""
    ensure_ray(cpus_needed(cfg, list(classes)))
    groups: dict[str, WorkerGroup] = {}
    shared: list = []
    # cores left to the rollout engines (placement.cpu_split), only when engines run in this run
    engine_share = cfg.placement.engine_core_share if cfg.split_cores() and "rollout" in roles_for(cfg) else None
    kwargs: dict[str, dict] = {}
    futures: dict = {}
    try:
        for colocated in cfg.placement.colocate:
            active = [r for r in colocated if r in classes]
            if not active:
                continue
            pg = _shared_group(cfg, active, "+".join(active))
            shared.append(pg)
            # colocated rollout engines (the hybrid engine) take a share of each bundle too
            share = len(active) + ("rollout" in colocated and "rollout" in roles_for(cfg))
            kwargs |= {role: {"placement_group": pg, "share": share} for role in active}
        # The groups start side by side: a worker's start is mostly imports on one core, so one after
        # another they would leave the other cores idle (three roles: 9 s -> 6-7 s on 2 cores, measured).
        with ThreadPoolExecutor(max(1, len(classes))) as pool:
            futures = {role: pool.submit(WorkerGroup, role, cls, role_slots(cfg, role), cfg.placement,
                                         engine_share=engine_share, **kwargs.get(role, {}))
                       for role, cls in classes.items()}
        failed = [f.exception() for f in futures.values() if f.exception() is not None]
        if failed:
            raise failed[0]
        groups = {role: f.result() for role, f in futures.items()}
    except BaseException:
        # every group that did start is stopped (leaving the `with` above waited for them all)
        groups = {role: f.result() for role, f in futures.items() if f.done() and f.exception() is None}
        stop_roles(groups, shared)
        raise
    return groups, shared


def stop_roles(groups: dict, shared: list) -> None:
    from ray.util.placement_group import remove_placement_group

    for g in groups.values():
        g.shutdown()
    for pg in shared:
        remove_placement_group(pg)
