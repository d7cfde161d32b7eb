"""WorkerGroup: N Ray actors playing one role, each a rank of one torch.distributed process group.

    group = WorkerGroup("actor", ActorWorker, num_workers=2, placement=cfg.placement)
    group.call("setup", cfg)                     # every rank, same arguments; returns a list by rank
    group.call_sharded("score", batch)           # rank r gets its data-parallel shard of `batch`
    group.shutdown()

Ordering contract:
1. Resources are checked against the cluster BEFORE anything starts: asking for more GPUs (or CPU
   slots) than the cluster has is an immediate error, never a placement group pending forever.
2. The placement group gets `placement.timeout_s` to become ready, else it is removed and an error
   names the role and the bundles.
3. Workers start, rank 0 picks the master address/port, then every rank joins the process group
   (gloo on CPU, nccl on GPU) in one concurrent call.
4. Every later call waits at most `placement.call_timeout_s`; a timeout names the role, the rank
   and the method.

`LocalGroup` has the same interface for one in-process worker, so trainers do not care which runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rlhf_system.config import ConfigError, PlacementConfig
from rlhf_system.distributed.devices import hide_gpus_here, on_gpu, worker_env
from rlhf_system.distributed.waits import blame, collect
from rlhf_system.errors import RunFailure

# Environment the workers need whatever cluster they land on (a Ray cluster does not forward the
# driver's environment to workers on other nodes).
FORWARDED_ENV = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM",
                 "WANDB_MODE", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS", "HF_DATASETS_CACHE", "TORCH_EXTENSIONS_DIR")


class GroupCallError(RunFailure):
    """A remote call failed or missed its deadline; the message names role, rank and method."""


def concat(parts: list) -> Any:
    """Per-rank results of a sharded call, in rank order: tensors stacked by rows (padded to the
    widest), tuples of them element by element, lists joined."""
    import torch

    if parts and isinstance(parts[0], tuple):
        return tuple(concat([p[i] for p in parts]) for i in range(len(parts[0])))
    if parts and isinstance(parts[0], torch.Tensor):
        from rlhf_system.data.experience import cat_rows

        return cat_rows(parts) if parts[0].dim() >= 2 else torch.cat(parts)
    return [x for part in parts for x in part]


# No prestarted idle workers: every actor of ours carries its own runtime_env (worker_env, CPU_ONLY_ENV), so
# Ray starts a fresh process for it anyway, and the idle ones' imports only compete with the actors'.
NO_IDLE_WORKERS = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}


def ensure_ray(num_cpus_needed: int = 0) -> None:
    """Connect to RAY_ADDRESS if set, else start a local Ray with at least `num_cpus_needed` CPUs."""
    import ray

    if ray.is_initialized():
        return
    # Inside a Ray Job (`ray job submit`, launch/ray_submit.sh) the job's runtime_env already carries its
    # env_vars to every worker, and Ray refuses a driver runtime_env that sets any of the same keys again.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in (job_env.get("env_vars") or {})}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # Logical CPUs: a CPU "slot" per worker even on a 2-core laptop (torch threads are capped per worker).
        ray.init(num_cpus=max(os.cpu_count() or 1, num_cpus_needed), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=True, _system_config=NO_IDLE_WORKERS)
        # This process now owns a cluster: if it is killed without shutting it down, the reaper does.
        from rlhf_system.distributed import reaper

        reaper.start()


def bundles_for(placement: PlacementConfig, n: int) -> list[dict[str, float]]:
    gpus = 1.0 if placement.gpus_per_node > 0 else 0.0
    bundle = {"CPU": placement.cpus_per_worker}
    if gpus:
        bundle["GPU"] = gpus
    return [dict(bundle) for _ in range(n)]


def check_resources(role: str, bundles: list[dict[str, float]], strategy: str = "PACK") -> None:
    """Fail now, naming what is missing, when the cluster cannot hold these bundles at all: in total,
    or (STRICT_SPREAD: one node per bundle; STRICT_PACK: all on one node) node by node. Ray would
    otherwise leave the placement group pending until placement.timeout_s."""
    import ray

    have = ray.cluster_resources()
    for res in ("GPU", "CPU"):
        need = sum(b.get(res, 0) for b in bundles)
        if need > have.get(res, 0):
            raise ConfigError(f"placement: role '{role}' needs {need:g} {res} ({len(bundles)} workers) but the Ray "
                              f"cluster has {have.get(res, 0):g}. Fix: shrink placement.{role}, or add nodes")
    if strategy not in ("STRICT_SPREAD", "STRICT_PACK"):
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if strategy == "STRICT_SPREAD":
        fits = sum(all(node.get(r, 0) >= bundles[0].get(r, 0) for r in ("CPU", "GPU")) for node in nodes)
        if fits < len(bundles):
            raise ConfigError(f"placement: role '{role}' has {len(bundles)} workers under STRICT_SPREAD (one node "
                              f"each) but only {fits} of the cluster's {len(nodes)} nodes can hold one "
                              f"({bundles[0]}). Fix: add nodes, shrink placement.{role}, or placement.strategy=SPREAD")
    elif not any(all(node.get(r, 0) >= sum(b.get(r, 0) for b in bundles) for r in ("CPU", "GPU")) for node in nodes):
        raise ConfigError(f"placement: role '{role}' needs {len(bundles)} workers on one node (STRICT_PACK) but no "
                          f"node of the cluster holds them all. Fix: placement.strategy=PACK, or shrink placement.{role}")


class WorkerGroup:
    def __init__(self, role: str, worker_cls: type, num_workers: int, placement: PlacementConfig,
                 placement_group=None, bundle_offset: int = 0, share: int = 1, engine_share: float | None = None):
        """`placement_group` (with `share` roles per bundle, see placement/roles.py) colocates this
        group with others: each worker then takes 1/share of its bundle's GPU and CPUs. `engine_share`:
        the workers leave that share of their node's cores to the rollout engines (cpu_split=disjoint)."""
        import ray
        from ray.util.placement_group import placement_group as make_pg
        from ray.util.placement_group import remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.role, self.timeout = role, placement.call_timeout_s
        self.engine_share = engine_share
        self.stuck: set[int] = set()  # ranks still busy after a deadline or a peer's failure
        bundles = bundles_for(placement, num_workers)
        ensure_ray(int(sum(b["CPU"] for b in bundles)))
        self._own_pg = placement_group is None
        if self._own_pg:
            check_resources(role, bundles, placement.strategy)
            placement_group = make_pg(bundles, strategy=placement.strategy, name=f"{role}-{os.getpid()}")
            try:
                ray.get(placement_group.ready(), timeout=placement.timeout_s)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(placement_group)
                raise GroupCallError(f"{role}: placement group {bundles} not ready within {placement.timeout_s:g}s "
                                     f"(strategy {placement.strategy}); the cluster cannot place it") from None
        self.pg = placement_group
        remote_cls = ray.remote(worker_cls)
        gpu = bundles[0].get("GPU", 0) / share
        env = worker_env(placement)  # a CPU placement's workers see no GPU (devices.py says why)
        self.workers = [
            remote_cls.options(
                num_cpus=bundles[0]["CPU"] / share, num_gpus=gpu, **({"runtime_env": {"env_vars": env}} if env else {}),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=bundle_offset + i),
            ).remote()
            for i in range(num_workers)
        ]
        try:
            addr, port = self._get([self.workers[0].master_endpoint.remote()], "master_endpoint")[0]
            self._get([w.init_dist.remote(r, num_workers, addr, port, on_gpu(placement))
                       for r, w in enumerate(self.workers)], "init_dist")
            self.threads = self._set_threads(placement, share)
        except BaseException:
            # A group that failed to start leaves nothing behind: its workers, and its placement group,
            # whose name (role-pid) the next group of this role in this process would otherwise collide with.
            for w in self.workers:
                ray.kill(w)
            if self._own_pg:
                remove_placement_group(placement_group)
            raise

    def _set_threads(self, placement: PlacementConfig, share: int) -> list[int]:
        """Each rank's torch threads, from the placement (distributed/threads.py): Ray would leave them at
        the actor's num_cpus, i.e. one thread."""
        from collections import Counter

        from rlhf_system.distributed.threads import trainer_threads

        split = self.engine_share
        where = self._get([w.where.remote(split) for w in self.workers], "where")
        per_node = Counter(node for node, _ in where)
        return self._get([w.set_threads.remote(trainer_threads(
            placement.threads_per_worker, placement.gpus_per_node, placement.cpus_per_worker, share,
            per_node[node], cores), split) for w, (node, cores) in zip(self.workers, where)], "set_threads")

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def _get(self, refs: list, method: str, timeout: float | None = None) -> list:
        import ray

        timeout = timeout or self.timeout
        results, errors, running = collect(refs, timeout)
        self.stuck.update(running)
        if errors:
            rank, also = blame(errors, running, [f"rank {r}" for r in range(len(refs))])
            e = errors[rank]
            if isinstance(e, ray.exceptions.RayActorError):
                raise GroupCallError(f"{self.role} rank {rank}: worker died during '{method}'{also}: {e}") from None
            cause = e.cause if getattr(e, "cause", None) is not None else e  # the worker's own exception: short
            raise GroupCallError(f"{self.role} rank {rank}: '{method}' failed: {type(cause).__name__}: {cause}{also}"
                                 ) from cause
        if running:
            raise GroupCallError(f"{self.role}: rank(s) {running} did not finish '{method}' within {timeout:g}s")
        return [results[r] for r in range(len(refs))]

    def call(self, method: str, *args, timeout: float | None = None, **kwargs) -> list[Any]:
        """Run `method` on every rank with the same arguments; results by rank."""
        refs = [getattr(w, method).remote(*args, **kwargs) for w in self.workers]
        return self._get(refs, method, timeout)

    def call_sharded(self, method: str, items, *args, timeout: float | None = None, **kwargs) -> Any:
        """Rank r gets the contiguous r-th slice of `items`; results are concatenated in rank order
        (lists joined, (b, T) tensors stacked by rows)."""
        return self.submit_sharded(method, items, *args, timeout=timeout, **kwargs)()

    def submit_sharded(self, method: str, items, *args, timeout: float | None = None, by_rank: bool = False,
                       **kwargs):
        """`call_sharded` without waiting: returns a function that waits (under the deadline) and
        returns the concatenated results (with by_rank, the list of each rank's result), so several
        groups can work at the same time. `items`: a list, or an Experience (data/experience.py)."""
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"{self.role}: {n} items do not split evenly over {self.world_size} ranks")
        k = n // self.world_size
        refs = [getattr(w, method).remote(items[r * k:(r + 1) * k], *args, **kwargs)
                for r, w in enumerate(self.workers)]
        if by_rank:
            return lambda: self._get(refs, method, timeout)
        return lambda: concat(self._get(refs, method, timeout))

    def submit(self, method: str, *args, timeout: float | None = None, **kwargs):
        """`call` without waiting; the returned function waits and returns the results by rank."""
        refs = [getattr(w, method).remote(*args, **kwargs) for w in self.workers]
        return lambda: self._get(refs, method, timeout)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        # Teardown closes the ranks' process group together. With a rank stuck in a call (it would take
        # teardown only after the hang, and the others would wait for it) every rank is killed unasked.
        if not self.stuck:
            try:
                self._get([w.teardown.remote() for w in self.workers], "teardown", timeout=60)
            except GroupCallError:
                pass  # a dead worker cannot tear down; killing it below is enough
        for w in self.workers:
            ray.kill(w)
        if self._own_pg:
            remove_placement_group(self.pg)


class LocalGroup:
    """One in-process worker behind the WorkerGroup interface (no Ray)."""

    def __init__(self, role: str, worker_cls: type, placement: PlacementConfig | None = None):
        from rlhf_system.distributed.threads import node_cores, trainer_threads

        self.role = role
        p = placement or PlacementConfig()
        if not on_gpu(p):
            hide_gpus_here()
        self.workers = [worker_cls()]
        self.workers[0].init_dist(0, 1, "127.0.0.1", None, on_gpu(p))
        self.threads = [self.workers[0].set_threads(trainer_threads(
            p.threads_per_worker, p.gpus_per_node, p.cpus_per_worker, 1, 1, len(node_cores())))]

    world_size = 1

    def call(self, method: str, *args, timeout: float | None = None, **kwargs) -> list[Any]:
        return [getattr(self.workers[0], method)(*args, **kwargs)]

    def call_sharded(self, method: str, items, *args, timeout: float | None = None, **kwargs) -> Any:
        return getattr(self.workers[0], method)(items, *args, **kwargs)

    def submit_sharded(self, method: str, items, *args, timeout: float | None = None, by_rank: bool = False,
                       **kwargs):
        result = self.call_sharded(method, items, *args, **kwargs)  # in-process: runs now
        return lambda: [result] if by_rank else result

    def submit(self, method: str, *args, timeout: float | None = None, **kwargs):
        result = self.call(method, *args, **kwargs)
        return lambda: result

    def shutdown(self) -> None:
        self.workers[0].teardown()


def make_group(role: str, worker_cls: type, num_workers: int, placement: PlacementConfig):
    """LocalGroup or WorkerGroup, as placement.launcher says."""
    use_ray = placement.launcher == "ray" or (placement.launcher == "auto" and (
        num_workers > 1 or placement.nodes > 1 or bool(os.environ.get("RAY_ADDRESS"))))
    return (WorkerGroup(role, worker_cls, num_workers, placement) if use_ray
            else LocalGroup(role, worker_cls, placement))
