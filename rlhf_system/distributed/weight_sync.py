"""Weight sync, actor -> every vLLM engine: the one contract.

    sync = WeightSync(actor_group, rollout_group, cfg.rollout.sync_timeout_s, sync_backend(cfg))
    sync.open()                     # once: plan, group / store, every engine worker joins
    ...                             # generate (engines awake)
    sync.sleep_engines()            # colocated engines free the devices; a no-op otherwise
    ...                             # inference and training on the actor's devices
    sync.sync()                     # (wake weights) -> every bucket -> (wake KV cache) -> reset prefix caches
    sync.close()

Transports (distributed/sync_transport.py has the wire): each bucket of tensors is flattened into one
buffer; the receiving vLLM worker (distributed/vllm_ext.py) splits it back into named tensors and
reloads them in place through vLLM's own reload path.
- Engines on their own devices: a broadcast from actor rank 0 (sync rank 0) on a group separate from
  the trainers' own: gloo on CPU, NCCL on GPUs (vLLM's PyNcclCommunicator on a StatelessProcessGroup).
  Engine e's vLLM worker w is sync rank 1 + e * workers_per_engine + w. CI runs the NCCL code path on
  CPU with the communicator replaced by distributed/fake_nccl.py.
- Engines colocated with the actor (placement.colocate with rollout beside actor: the hybrid engine):
  every actor rank r is a sender (sync rank r); engine worker j (sync rank k + j, k actor ranks) maps
  the buckets of actor rank j % k, on its own device: CUDA IPC handles on GPUs, shared-memory files on
  CPU. Only the handles cross a socket (the TCPStore); `WeightSync.wire_bytes` counts them.

Order of calls (the controller, trainers/ppo.py, drives it through `WeightSync`):
 1. open   actor rank 0 `ws_open(world, backend)`: builds the bucket plan (names, dtypes, shapes; LoRA
           merged names) and binds the store's listening socket at once (an OS-picked port: nothing can
           take it between choosing and binding). Returns (addr, port, plan).
 2. join   concurrently: every engine `ws_join(addr, port, rank_offset, world, timeout, backend, k)` and
           the sending actor ranks `ws_connect(...)`. Each side blocks in the rendezvous until all have
           arrived, so the two MUST be in flight together; the controller waits for both under one
           deadline.
 3. send   per sync, with the engines idle: the rollout pipeline (trainers/pipeline.py) holds its
           `engines` lock while it generates, and the sync takes it. Colocated engines are woken first
           for their weights only, and for the KV cache after the load (`sleep_engines` put them to sleep
           before the trainers' phases; the actor ranks release their cached device memory first).
           Every actor rank runs `ws_send(plan)` (under ZeRO-3 each bucket is a collective gather; rank 0
           broadcasts, or every rank maps its copy when colocated) while every engine runs
           `ws_receive(plan)`. Same deadline rule as 2. Memory is bounded by the bucket on both sides: the sender holds one gathered, flattened bucket at a
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
Every step has a deadline, rollout.sync_timeout_s: inside, every transfer waits at most that long (NCCL's
broadcasts are polled through an event and the communicator aborted when it passes); outside, the
controller stops at the first failure and names who failed first (an engine that raised mid-sync, not
the sender left waiting for it).
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
    of: str | None = None   # a part of this fused in-memory parameter (checkpoint_parts), or None: the parameter


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
        parts = checkpoint_parts(model, name, dtype, _ds_shape(p))
        if parts is None:
            out.append(_Source(TensorMeta(name, dtype, _ds_shape(p)), p, lora_module))
        else:
            out += [_Source(m, p, lora_module, of=name) for m in parts]
    return out


def checkpoint_parts(model: torch.nn.Module, name: str, dtype: str, shape: tuple[int, ...]) -> list[TensorMeta] | None:
    """The checkpoint tensors an in-memory parameter stands for, or None when it is one of them as it is.

    transformers 5 converts some checkpoints on load: MoE experts (Qwen2-MoE, Mixtral, ...) become one 3D
    tensor per layer (`mlp.experts.gate_up_proj`) from E x 2 separate `experts.{e}.gate_proj.weight`.
    vLLM loads checkpoint names only, and skips others without an error, so a sync that sent the fused
    names left every expert at its old weights (`rlhf check-model` found it: log-prob gap 7e-2 after
    the sync). transformers' own reversal (what save_pretrained writes) gives the names and shapes, run
    on a meta tensor once per parameter."""
    cache = model.__dict__.setdefault("_rlhf_checkpoint_parts", {})
    if name not in cache:
        from transformers.core_model_loading import revert_weight_conversion

        out = revert_weight_conversion(model, {name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")})
        cache[name] = None if list(out) == [name] else [TensorMeta(k, dtype, tuple(v.shape)) for k, v in out.items()]
    return cache[name]


def checkpoint_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory (name, tensor) pairs -> the checkpoint's (checkpoint_parts): what a file or vLLM expects."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


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
    return list({id(p): p for p in params}.values())  # the parts of one fused parameter share it


def _flat(model: torch.nn.Module, srcs: list[_Source]) -> torch.Tensor:
    """One bucket's tensors, merged and converted to checkpoint form, as one flat buffer."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    flat = []
    for s in srcs:
        if s.of is None:
            flat.append(_merged(s).reshape(-1))
            continue
        if s.of not in parts:  # each fused parameter is split once per bucket
            parts[s.of] = checkpoint_tensors(model, {s.of: _merged(s)})
        flat.append(parts[s.of][s.meta.name].reshape(-1))
    return torch.cat(flat)


def iter_buckets(module: torch.nn.Module, plan: Plan, zero_stage: int, is_sender: bool) -> Iterator[torch.Tensor | None]:
    """Flat buffers, one per bucket of `plan`. Under ZeRO-3 every rank must iterate (each bucket is a
    collective gather); non-senders get None. The buffer is a copy, valid after the gather ends."""
    import deepspeed

    by_name = {s.meta.name: s for s in sources(module)}
    model = _hf_model(module)
    for bucket in plan:
        srcs = [by_name[m.name] for m in bucket]
        gather = (deepspeed.zero.GatheredParameters(_bucket_params(srcs), modifier_rank=None)
                  if zero_stage == 3 else contextlib.nullcontext())
        with gather, torch.no_grad():
            yield _flat(model, srcs) if is_sender else None


def unflatten(buffer: torch.Tensor, bucket: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for m in bucket:
        out.append((m.name, buffer[offset:offset + m.numel].view(m.shape)))
        offset += m.numel
    return out


# ------------------------------------------------------------------------ the actor's side
class ActorSender:
    """One actor rank's side of the contract (workers/actor.py hosts it; the wire is sync_transport.py).

        side = ActorSender(rank, cfg)
        addr, port, plan = side.open(module, world, backend, addr)   # actor rank 0 only
        side.connect(addr, port, backend, world, receivers)          # the sending ranks, beside the engines' join
        side.send(module, plan)                                      # every actor rank, each sync
        side.close()
    """

    def __init__(self, rank: int, cfg):
        self.rank, self.cfg = rank, cfg
        self.link = None
        self._listening = None
        self.backend = "gloo"

    def open(self, module: torch.nn.Module, world: int, backend: str, addr: str) -> tuple[str, int, Plan]:
        from rlhf_system.distributed.sync_transport import Sender

        plan = plan_buckets([s.meta for s in sources(module)], self.cfg.rollout.sync_bucket_bytes)
        self._listening = Sender.listen(backend, addr, world, self.cfg.rollout.sync_timeout_s)
        return addr, self._listening.port, plan

    def connect(self, addr: str, port: int, backend: str, world: int, receivers: list[int]) -> int:
        from rlhf_system.distributed.sync_transport import Sender

        self.backend = backend
        self.link = self._listening or Sender(backend, self.rank, world, self.cfg.rollout.sync_timeout_s)
        self._listening = None
        self.link.connect(addr, port, self.rank, receivers)
        return self.rank

    def send(self, module: torch.nn.Module, plan: Plan, device) -> dict:
        """Every actor rank iterates (ZeRO-3 gathers are collective); the ranks with a link send: rank 0
        for broadcast backends, each rank for mapped ones. Returns the buckets sent, the bytes that
        crossed a socket for mapped backends, and the rise in this process's memory the sync needed."""
        from rlhf_system.distributed.memory import PeakMemory

        n = 0
        wire_before = self.link.wire_bytes if self.link is not None else 0
        with PeakMemory(device) as peak:
            for buf in iter_buckets(module, plan, self.cfg.deepspeed.zero_stage, self.link is not None):
                if buf is not None:
                    self.link.send(buf.contiguous())
                    n += 1
                del buf  # before the next bucket is gathered: one at a time
            if self.link is not None:
                self.link.finish()
        wire = self.link.wire_bytes - wire_before if self.link is not None else 0  # this sync's
        return {"buckets": n, "peak_rise_bytes": peak.rise, "wire_bytes": wire}

    def close(self) -> None:
        for link in (self.link, self._listening):
            if link is not None:
                link.close()
        self.link = self._listening = None


def colocated_engines(cfg) -> bool:
    """Whether the rollout engines share the actor's devices (the hybrid engine, placement.colocate)."""
    return any("rollout" in group for group in cfg.placement.colocate)


def sync_backend(cfg) -> str:
    """The transport for this run: mapped handles for colocated engines (CUDA IPC on GPUs, shared memory
    on CPU), else rollout.sync_backend (auto: NCCL on GPUs, gloo on CPU)."""
    gpu = cfg.placement.gpus_per_node > 0
    if colocated_engines(cfg):
        return "ipc" if gpu else "shm"
    if cfg.rollout.sync_backend != "auto":
        return cfg.rollout.sync_backend
    return "nccl" if gpu else "gloo"


# ------------------------------------------------------------------------ controller side
class WeightSyncError(RunFailure):
    """A sync step failed or missed its deadline; names the engine(s)."""


class WeightSync:
    """Drives the contract above between an actor WorkerGroup and a RolloutGroup.

    `backend` (sync_backend): gloo / nccl broadcast from actor rank 0, or, for engines colocated with the
    actor (ipc / shm), every actor rank maps its buckets to the engine workers on its own device. Colocated
    engines sleep while the trainers use the devices (`sleep_engines`), and `sync` wakes them in two
    stages, as vLLM's hybrid-engine users do: weights first (so the load never lands in a sleeping
    engine), then, once the weights are in, the KV cache. With `sleep_level=2` the engines drop their
    weights while asleep; the sync after it restores every tensor (a plan covers the whole model), and
    an engine refuses to generate until it has (workers/rollout.py keeps that state).
    """

    MARGIN_S = 30.0  # the controller waits this much longer than the transfer's own deadline, so the
    # side that timed out reports first, with the name of the peer it waited for

    def __init__(self, actor_group, rollout_group, timeout_s: float, backend: str = "gloo", sleep_level: int = 1):
        from rlhf_system.distributed.sync_transport import MAPPED

        self.actor, self.rollout, self.timeout = actor_group, rollout_group, timeout_s
        self.backend, self.sleep_level = backend, sleep_level
        self.colocated = backend in MAPPED
        self.plan: Plan | None = None
        self.memory: dict[str, int | None] = {}
        self.phase_memory: dict[str, float] = {}  # colocated: free device memory after each phase (GiB)
        self.wire_bytes = 0
        self.received: list[dict] = []

    def _both(self, actor_refs: list, engine_refs: list, what: str) -> list:
        from rlhf_system.distributed.waits import wait_all

        names = [f"actor rank {i}" for i in range(len(actor_refs))] + [f"engine {i}" for i in range(len(engine_refs))]
        # stop at the first failure: its peers are stuck in the transfer until their own deadline
        return wait_all(actor_refs + engine_refs, names, self.timeout + self.MARGIN_S, f"weight sync '{what}'",
                        WeightSyncError, stop_on_error=True)

    @property
    def senders(self) -> list:
        return self.actor.workers if self.colocated else self.actor.workers[:1]

    def open(self) -> None:
        import ray

        n, per_engine = self.rollout.num_workers_total, self.rollout.workers_per_engine
        k = len(self.senders)
        world = k + n
        addr, port, plan = ray.get(self.actor.workers[0].ws_open.remote(world, self.backend), timeout=self.timeout)
        self.plan = plan
        # engine worker j is sync rank k + j and maps (colocated) the buckets of actor rank j % k
        actor_refs = [w.ws_connect.remote(addr, port, self.backend, world, [k + j for j in range(n) if j % k == r])
                      for r, w in enumerate(self.senders)]
        engine_refs = [e.ws_join.remote(addr, port, k + i * per_engine, world, self.timeout, self.backend, k)
                       for i, e in enumerate(self.rollout.engines)]
        self._both(actor_refs, engine_refs, "join")

    def sleep_engines(self) -> None:
        """Colocated engines free the devices for the trainers (level 1: weights to host memory, KV cache
        dropped; level 2: both dropped). A no-op for engines on their own devices."""
        if self.colocated:
            freed = self._both([], [e.sleep.remote(self.sleep_level) for e in self.rollout.engines], "sleep")
            self._note("after_sleep", freed)

    def sync(self) -> float:
        """Push the actor's current weights into every engine; returns seconds taken. `self.memory` then
        holds the largest rise in memory any actor rank and any engine worker needed for it (bytes,
        None where unmeasured: distributed/memory.py)."""
        import time

        t = time.perf_counter()
        if self.colocated:
            # the trainers hand their cached blocks back before the engines take memory again (wake-up OOM)
            self._both([w.release_memory.remote() for w in self.actor.workers], [], "release_memory")
            self._note("after_wake_weights",
                       self._both([], [e.wake_up.remote(["weights"]) for e in self.rollout.engines], "wake weights"))
        actor_refs = [w.ws_send.remote(self.plan) for w in self.actor.workers]  # every rank: ZeRO-3 gathers
        engine_refs = [e.ws_receive.remote(self.plan) for e in self.rollout.engines]
        done = self._both(actor_refs, engine_refs, "send")
        sent, received = done[:len(actor_refs)], [w for engine in done[len(actor_refs):] for w in engine]
        self.memory = {"actor_peak_rise_bytes": _max_known(r["peak_rise_bytes"] for r in sent),
                       "engine_peak_rise_bytes": _max_known(r["peak_rise_bytes"] for r in received)}
        self.wire_bytes = sum(r["wire_bytes"] for r in sent)
        self.received = received  # each engine worker's report (rank, backend, tensors): tests check them
        if self.colocated:
            self._note("after_wake_kv_cache",
                       self._both([], [e.wake_up.remote(["kv_cache"]) for e in self.rollout.engines], "wake kv_cache"))
        self._both([], [e.reset_prefix_cache.remote() for e in self.rollout.engines], "reset_prefix_cache")
        return time.perf_counter() - t

    def _note(self, phase: str, per_engine: list) -> None:
        """Free device memory reported by the engines after a phase (the smallest; None on CPU)."""
        known = [v for v in per_engine if v is not None]
        if known:
            self.phase_memory[f"hybrid/free_gib_{phase}"] = min(known) / 2**30

    def close(self) -> None:
        import ray

        refs = [w.ws_close.remote() for w in self.senders] + [e.ws_close.remote() for e in self.rollout.engines]
        ray.wait(refs, num_returns=len(refs), timeout=30)  # best effort: a dead peer must not block shutdown


def _max_known(values) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None
