"""Weight sync, actor -> every vLLM engine: the one contract.

Transports
- CPU (what tests and laptops run): a gloo process group made by hand on a TCPStore, separate from the
  trainers' own process group. Actor rank 0 is sync rank 0 (the sender); engine e's vLLM worker w is
  sync rank 1 + e * workers_per_engine + w. Each bucket of tensors is flattened into one buffer and
  broadcast once; the receiving vLLM worker (distributed/vllm_ext.py) splits it back into named
  tensors and reloads them in place.
- GPU: the same bucketed broadcast over NCCL (vLLM's PyNcclCommunicator on a StatelessProcessGroup,
  so it never touches the trainers' default group). Written to the same contract; NOT exercised by
  this project's CI, which has no GPU. CUDA IPC for colocated engines is not built yet.

Order of calls (the controller, trainers/ppo.py, drives it through `WeightSync`):
 1. open   actor rank 0 `ws_open(world)`: builds the bucket plan (names, dtypes, shapes; LoRA merged
           names), picks a free port, starts the TCPStore master. Returns (addr, port, plan).
 2. join   concurrently: every engine `ws_join(addr, port, rank_offset, world)` and actor rank 0
           `ws_connect()`. Each side blocks in the group's rendezvous until all have arrived, so the
           two MUST be in flight together; the controller waits for both under one deadline.
 3. send   per sync, with the engines idle (no generate in flight; the controller is synchronous):
           every actor rank runs `ws_send(plan)` (under ZeRO-3 each bucket is a collective gather; only rank
           0 broadcasts) while every engine runs `ws_receive(plan)`. Same deadline rule as 2. Memory is
           bounded by the bucket on both sides: the sender holds one gathered, flattened bucket at a
           time; the engine loads each bucket as it arrives, so beyond its own weights it holds the
           bucket in flight (and, while a vLLM layer whose weights straddle two buckets waits for the
           rest, the one before). Both report the rise they measured.
           Bucket size: rollout.sync_bucket_mb. A tensor larger than that travels alone in a bucket of
           its own, as verl and OpenRLHF send it (a large vocabulary's embedding: Llama-3-8B's is 1 GB in
           bf16), so the bound is max(bucket, largest tensor). A sync_bucket_mb the user SET is a bound
           they asked for: a tensor above it is refused before workers start (`check_bucket_size`,
           called by trainers/preflight.py), with the fix.
 4. reset  every engine resets its prefix cache: cached KV blocks were computed by the old weights.
 5. close  at shutdown: both sides drop the group; a dead peer must not block it.
Every step has a deadline (the gloo/NCCL timeout inside, the controller's ray.wait outside); a miss
raises an error that names the engine(s) that did not answer.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_system.config import ConfigError
from rlhf_system.errors import RunFailure


@dataclass(frozen=True)
class TensorMeta:
    name: str          # the Hugging Face checkpoint name, as vLLM's load_weights expects it
    dtype: str         # e.g. "float32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


Plan = list[list[TensorMeta]]  # buckets, in send order; every tensor in a bucket has the same dtype


# ------------------------------------------------------------------------- what the actor sends
@dataclass
class _Source:
    """One checkpoint tensor: the parameter it comes from and, for a LoRA layer, the module whose
    adapter delta must be added (merged) before sending."""
    meta: TensorMeta
    param: torch.nn.Parameter
    lora_module: torch.nn.Module | None = None


def _hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model inside a PeftModel (or the module itself)."""
    get_base = getattr(module, "get_base_model", None)
    return get_base() if callable(get_base) else module


def _ds_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    # Under ZeRO-3 a partitioned parameter is a 0-size placeholder; ds_shape holds the real shape.
    return tuple(getattr(p, "ds_shape", p.shape))


def sources(module: torch.nn.Module) -> list[_Source]:
    """Checkpoint tensors of the policy, LoRA merged: peft names `x.base_layer.weight` become `x.weight`
    (plus that layer's delta), adapter parameters themselves are not sent."""
    model = _hf_model(module)
    out = []
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        if "modules_to_save" in name or "original_module" in name:
            raise NotImplementedError(f"weight sync: peft modules_to_save ({name}) is not supported")
        lora_module = None
        if ".base_layer." in name:
            owner = name.rsplit(".base_layer.", 1)[0]
            if name.endswith(".weight"):
                lora_module = model.get_submodule(owner)
            name = name.replace(".base_layer.", ".")
        dtype = str(p.dtype).removeprefix("torch.")
        out.append(_Source(TensorMeta(name, dtype, _ds_shape(p)), p, lora_module))
    return out


def _unit(name: str) -> str:
    """Tensors that vLLM may fuse into one layer (q/k/v into qkv_proj, gate/up into gate_up_proj) share
    a unit: their decoder layer ("model.layers.3."). Anything else is its own unit."""
    m = re.match(r"(.*\.layers\.\d+\.)", name)
    return m.group(1) if m else name


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> Plan:
    """Buckets in parameter order, each at most `bucket_bytes`, holding whole decoder layers where one
    fits: the engine loads a vLLM layer once all of its weights have arrived, and a layer split across
    two buckets would keep the first bucket's buffer alive while the second arrives. A new bucket also
    starts on a dtype change. A tensor larger than `bucket_bytes` is a bucket of its own: each side's
    extra memory during a sync is then bounded by max(bucket_bytes, the largest tensor)."""
    units: list[list[TensorMeta]] = []
    for m in metas:
        if units and _unit(units[-1][-1].name) == _unit(m.name) and units[-1][-1].dtype == m.dtype:
            units[-1].append(m)
        else:
            units.append([m])
    buckets: Plan = []
    size = 0
    for unit in units:
        unit_bytes = sum(m.nbytes for m in unit)
        if unit_bytes > bucket_bytes:  # a layer bigger than a bucket: split it between its tensors
            pieces = [[m] for m in unit]
        else:
            pieces = [unit]
        for piece in pieces:
            nbytes = sum(m.nbytes for m in piece)
            # An oversize tensor opens a bucket and leaves it over-full, so the next piece opens another.
            if not buckets or buckets[-1][0].dtype != piece[0].dtype or size + nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].extend(piece)
            size += nbytes
    return buckets


def bucket_too_small(name: str, nbytes: int, bucket_bytes: int) -> str:
    return (f"rollout.sync_bucket_mb={round(bucket_bytes / 2**20, 3):g} is smaller than the model's tensor {name} "
            f"({nbytes / 2**20:.2f} MB). Fix: rollout.sync_bucket_mb={math.ceil(nbytes / 2**20)} or more, or leave "
            "it unset (a tensor larger than the default bucket then travels alone)")


def check_bucket_size(model_path: str, bucket_bytes: int, element_size: int) -> None:
    """Before any worker starts, for a bucket size the user set: the largest tensor of the checkpoint at
    `model_path` (its safetensors headers, every shard, read without loading a weight), at the training
    dtype's `element_size`, fits a bucket. Checkpoints without safetensors files (a hub id) are not
    checked: their largest tensor travels alone like any oversize one."""
    largest, name = 0, ""
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, info in header.items():
            if key != "__metadata__" and math.prod(info["shape"]) > largest:
                largest, name = math.prod(info["shape"]), key
    if largest * element_size > bucket_bytes:
        raise ConfigError(bucket_too_small(name, largest * element_size, bucket_bytes))


def _merged(src: _Source) -> torch.Tensor:
    w = src.param.data
    if src.lora_module is None:
        return w
    delta = torch.zeros_like(w)
    for adapter in src.lora_module.active_adapters:
        if adapter in src.lora_module.lora_A:
            delta += src.lora_module.get_delta_weight(adapter).to(w.dtype)
    return w + delta


def _bucket_params(srcs: list[_Source]) -> list[torch.nn.Parameter]:
    params = []
    for s in srcs:
        params.append(s.param)
        if s.lora_module is not None:
            params += list(s.lora_module.lora_A.parameters()) + list(s.lora_module.lora_B.parameters())
    return params


def iter_buckets(module: torch.nn.Module, plan: Plan, zero_stage: int, is_sender: bool) -> Iterator[torch.Tensor | None]:
    """Flat buffers, one per bucket of `plan`. Under ZeRO-3 every rank must iterate (each bucket is a
    collective gather); non-senders get None. The buffer is a copy, valid after the gather ends."""
    import deepspeed

    by_name = {s.meta.name: s for s in sources(module)}
    for bucket in plan:
        srcs = [by_name[m.name] for m in bucket]
        gather = (deepspeed.zero.GatheredParameters(_bucket_params(srcs), modifier_rank=None)
                  if zero_stage == 3 else contextlib.nullcontext())
        with gather, torch.no_grad():
            yield torch.cat([_merged(s).reshape(-1) for s in srcs]) if is_sender else None


def unflatten(buffer: torch.Tensor, bucket: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for m in bucket:
        out.append((m.name, buffer[offset:offset + m.numel].view(m.shape)))
        offset += m.numel
    return out


# ------------------------------------------------------------------------ the process group
def listen(addr: str, world: int, timeout_s: float):
    """Rank 0's TCPStore (gloo), listening at once on a port the OS picks (`.port`): no window between
    choosing a free port and binding it, in which another process can take it (a resumed run after a
    SIGKILLed one failed with EADDRINUSE that way)."""
    from datetime import timedelta

    return torch.distributed.TCPStore(addr, 0, world, True, timeout=timedelta(seconds=timeout_s),
                                      wait_for_workers=False)


def make_group(backend: str, addr: str, port: int, rank: int, world: int, timeout_s: float, is_master: bool,
               store=None):
    """A process group outside torch.distributed's default one: (group, store).

    gloo: ProcessGroupGloo on a TCPStore (rank 0 hosts the store: `store` from `listen`, else made here).
    nccl: vLLM's PyNcclCommunicator on a StatelessProcessGroup, which is what vLLM's own weight-transfer
    engines use.
    """
    from datetime import timedelta

    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        if store is None:
            store = torch.distributed.TCPStore(addr, port, world, is_master, timeout=timeout, wait_for_workers=False)
        return torch.distributed.ProcessGroupGloo(store, rank, world, timeout), store
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=addr, port=port, rank=rank, world_size=world,
                                      store_timeout=int(timeout_s))
    return PyNcclCommunicator(pg, device=torch.cuda.current_device()), pg


def broadcast(group, backend: str, tensor: torch.Tensor) -> None:
    """Broadcast from sync rank 0 (in place on receivers)."""
    if backend == "gloo":
        group.broadcast(tensor, 0).wait()
    else:
        group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


# ------------------------------------------------------------------------ controller side
class WeightSyncError(RunFailure):
    """A sync step failed or missed its deadline; names the engine(s)."""


class WeightSync:
    """Drives the contract above between an actor WorkerGroup and a RolloutGroup."""

    def __init__(self, actor_group, rollout_group, timeout_s: float):
        self.actor, self.rollout, self.timeout = actor_group, rollout_group, timeout_s
        self.plan: Plan | None = None
        self.memory: dict[str, int | None] = {}

    def _both(self, actor_refs: list, engine_refs: list, what: str) -> list:
        from rlhf_system.distributed.waits import wait_all

        names = [f"actor rank {i}" for i in range(len(actor_refs))] + [f"engine {i}" for i in range(len(engine_refs))]
        return wait_all(actor_refs + engine_refs, names, self.timeout, f"weight sync '{what}'", WeightSyncError)

    def open(self) -> None:
        import ray

        world = 1 + self.rollout.num_workers_total
        addr, port, plan = ray.get(self.actor.workers[0].ws_open.remote(world), timeout=self.timeout)
        self.plan = plan
        actor_refs = [self.actor.workers[0].ws_connect.remote()]
        engine_refs = [e.ws_join.remote(addr, port, 1 + i * self.rollout.workers_per_engine, world, self.timeout)
                       for i, e in enumerate(self.rollout.engines)]
        self._both(actor_refs, engine_refs, "join")

    def sync(self) -> float:
        """Push the actor's current weights into every engine; returns seconds taken. `self.memory` then
        holds the largest rise in memory any actor rank and any engine worker needed for it (bytes,
        None where unmeasured: distributed/memory.py)."""
        import time

        t = time.perf_counter()
        actor_refs = [w.ws_send.remote(self.plan) for w in self.actor.workers]  # every rank: ZeRO-3 gathers
        engine_refs = [e.ws_receive.remote(self.plan) for e in self.rollout.engines]
        done = self._both(actor_refs, engine_refs, "send")
        sent, received = done[:len(actor_refs)], [w for engine in done[len(actor_refs):] for w in engine]
        self.memory = {"actor_peak_rise_bytes": _max_known(r["peak_rise_bytes"] for r in sent),
                       "engine_peak_rise_bytes": _max_known(r["peak_rise_bytes"] for r in received)}
        self._both([], [e.reset_prefix_cache.remote() for e in self.rollout.engines], "reset_prefix_cache")
        return time.perf_counter() - t

    def close(self) -> None:
        import ray

        refs = [self.actor.workers[0].ws_close.remote()] + [e.ws_close.remote() for e in self.rollout.engines]
        ray.wait(refs, num_returns=len(refs), timeout=30)  # best effort: a dead peer must not block shutdown


def _max_known(values) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None
