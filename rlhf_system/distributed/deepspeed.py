"""DeepSpeed from our config tree: the ZeRO config builder, optimizer, LR schedule and engine set-up.

    dist_init()                                   # gloo on CPU, nccl on GPU; idempotent
    engine = train_engine(lambda: load_causal_lm(...), cfg, dp_size=world, total_steps=n)  # ZeRO-3: partitioned load
    loss = ...; engine.backward(loss); engine.step()   # DeepSpeed handles accumulation boundaries

The DeepSpeed JSON is always derived from `RunConfig` (never hand-written), so batch arithmetic and
precision come from one validated place. What this file is not: it does not start processes (Ray
does, placement/group.py) and holds no training loop (trainers/).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from datetime import timedelta

import torch

from rlhf_system.config import OptimConfig, RunConfig

DIST_TIMEOUT_S = 600  # every collective has a deadline: a hung peer becomes an error, not a hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_init(rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int | None = None,
              timeout_s: float = DIST_TIMEOUT_S, gpu: bool = False) -> None:
    """Join (or create) the default process group through deepspeed.init_distributed: NCCL for a GPU
    placement, gloo for a CPU one (`gpu` comes from the config, devices.on_gpu, not from what this
    process sees)."""
    import deepspeed
    import torch.distributed as dist

    from rlhf_system.distributed.devices import dist_backend

    if dist.is_initialized():
        return
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank % max(1, torch.cuda.device_count()) if gpu else rank),
                       "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port or free_port())})
    deepspeed.init_distributed(dist_backend=dist_backend(gpu), auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))


def dist_teardown() -> None:
    """Destroy the process group explicitly: ZeRO-3 aborts at interpreter exit otherwise (CPU_STACK.md)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        # DeepSpeed keeps a clone of the world group it made; a later run in this process (an
        # experiment's next point) must not reuse it, since its process group is gone.
        from deepspeed.utils import groups

        groups._WORLD_GROUP = None


def grad_accum_steps(cfg: RunConfig, dp_size: int) -> int:
    return cfg.train.global_batch_size // (dp_size * cfg.train.micro_batch_size)


def build_ds_config(cfg: RunConfig, dp_size: int, trainable: bool = True) -> dict:
    """The DeepSpeed config dict for a trained role (or a frozen one with trainable=False)."""
    dtype = cfg.train_dtype()
    ds = cfg.deepspeed
    stage = ds.zero_stage if trainable else ds.frozen_zero_stage
    zero: dict = {"stage": stage}
    offload_opt = trainable and ds.offload_optimizer
    offload_par = ds.offload_params if trainable else ds.frozen_offload
    pin = cfg.placement.gpus_per_node > 0  # pinned host memory only helps (and only exists) beside a GPU
    if offload_opt:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload_par and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if stage == 3:
        # Gather full 16-bit weights on save so HF export works without a conversion step.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, dp_size) if trainable else 1,
        "train_batch_size": cfg.train.global_batch_size if trainable else cfg.train.micro_batch_size * dp_size,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if trainable and cfg.optim.grad_clip > 0:
        config["gradient_clipping"] = cfg.optim.grad_clip
    return config


def lr_lambda(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak LR: linear warmup, then cosine / linear decay to min_ratio, or constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def make_optimizer(params, optim: OptimConfig, offload: bool, lr: float | None = None):
    """AdamW; DeepSpeed's CPU Adam when optimizer states are offloaded (it runs the step on CPU)."""
    groups = [p for p in params if p.requires_grad]
    kwargs = {"lr": lr or optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


@contextlib.contextmanager
def partitioned_load(config: dict):
    """Models that transformers builds inside are, under ZeRO-3, partitioned as they are created:
    transformers' HfDeepSpeedConfig turns `from_pretrained` into deepspeed.zero.Init plus a load of
    each weight into its partition, so no rank ever holds the whole model (each reads the checkpoint
    one tensor at a time). A no-op for stages 0-2, whose ranks all hold the full weights anyway."""
    if config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(config)  # transformers holds it by a weak reference: keep it for the load
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # later loads in this process (an export's merge) are plain again
        del keep


def train_engine(load, cfg: RunConfig, dp_size: int, total_steps: int, lr: float | None = None):
    """A DeepSpeed engine with optimizer and LR schedule for a trained role; `load()` builds its model
    (partitioned as it loads under ZeRO-3)."""
    import deepspeed

    config = build_ds_config(cfg, dp_size, trainable=True)
    with partitioned_load(config):
        model = load()
    optimizer = make_optimizer(model.parameters(), cfg.optim, cfg.deepspeed.offload_optimizer, lr)
    warmup = int(cfg.optim.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, cfg.optim.scheduler, cfg.optim.min_lr_ratio))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def frozen_engine(load, cfg: RunConfig, dp_size: int):
    """Inference-only engine for frozen roles (reference, reward): ZeRO-3 sharded (and partitioned as
    it loads) when deepspeed.frozen_zero_stage=3; `load()` builds the model."""
    import deepspeed

    config = build_ds_config(cfg, dp_size, trainable=False)
    with partitioned_load(config):
        model = load()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _gathered(engine, zero_stage: int, params: list | None = None):
    """Context that materialises ZeRO-3 partitions (of `params`, default all) on every rank; a no-op
    for stages 0-2."""
    import deepspeed

    if zero_stage == 3:
        return deepspeed.zero.GatheredParameters(params if params is not None else list(engine.module.parameters()),
                                                 modifier_rank=None)
    return contextlib.nullcontext()


def export_hf(engine, tokenizer, out, zero_stage: int, shard_bytes: int = 2 * 2**30):
    """Hugging Face export (safetensors) by rank 0. Collective: every rank must call it. transformers
    and vLLM load the folder as it is.

    Under ZeRO-3 the weights are gathered one shard of at most `shard_bytes` at a time and written as
    that shard's file (`model-0000k-of-0000n.safetensors` plus the index), so no rank ever holds the
    whole model. An adapter (a PeftModel) is small: only its trainable parameters are gathered."""
    from pathlib import Path

    import torch.distributed as dist

    module = engine.module
    adapter = hasattr(module, "peft_config")
    if zero_stage == 3 and not adapter:
        _export_zero3_sharded(module, Path(out), shard_bytes)
    else:
        params = [p for p in module.parameters() if p.requires_grad] if adapter else None
        with _gathered(engine, zero_stage, params):
            if dist.get_rank() == 0:
                module.save_pretrained(out, safe_serialization=True)
    if dist.get_rank() == 0 and tokenizer is not None:
        tokenizer.save_pretrained(out)
    dist.barrier()
    return Path(out)


def _export_zero3_sharded(model: torch.nn.Module, out, shard_bytes: int) -> None:
    import json

    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from rlhf_system.distributed.weight_sync import TensorMeta, checkpoint_tensors, plan_buckets

    persistent = set(model.state_dict().keys())  # drops non-persistent buffers (rotary caches)
    named = dict((n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n in persistent)
    # The weight sync's grouping (whole decoder layers per shard where one fits, a tensor over the limit
    # alone): one greedy by-size grouping for both. A partitioned parameter's full shape is its ds_shape.
    metas = [TensorMeta(n, str(t.dtype).removeprefix("torch."), tuple(getattr(t, "ds_shape", t.shape)))
             for n, t in named.items()]
    shards = [[(m.name, named[m.name]) for m in bucket] for bucket in plan_buckets(metas, shard_bytes)]
    rank0 = dist.get_rank() == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        params = [t for _, t in shard if hasattr(t, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
            if rank0:
                # checkpoint names and layout (fused MoE experts split again), as save_pretrained writes them
                tensors = checkpoint_tensors(model, {n: t.detach().cpu() for n, t in shard})
                tensors = {n: t.contiguous().clone() for n, t in tensors.items()}
                save_file(tensors, str(out / name), metadata={"format": "pt"})
                weight_map |= {n: name for n in tensors}
                total += sum(t.numel() * t.element_size() for t in tensors.values())
    if rank0:
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(out)


def gathered_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 parameters on CPU (collective under ZeRO-3): for tests and small-model checks."""
    with _gathered(engine, zero_stage):
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.named_parameters()}
