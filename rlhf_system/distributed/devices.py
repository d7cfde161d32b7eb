"""Which device a worker computes and communicates on: decided from the config, never from what a
process happens to see.

    on_gpu(cfg.placement)                  # placement.gpus_per_node > 0
    env = worker_env(cfg.placement)        # {"CUDA_VISIBLE_DEVICES": "", ...} for CPU placements
    total = all_reduce_sum(t, engine.device)   # reduced on the device the group's backend serves

Why from the config: Ray 2.60 no longer hides GPUs from actors that reserve none, so on a CUDA host a
CPU placement (gpus_per_node=0) would see the GPUs, pick NCCL and bf16, and every worker would land on
cuda:0. CPU placements therefore start their workers and engines with the GPUs hidden, and the choices
below (backend, dtype, device) follow the placement, so a driver with CUDA and workers without it agree.

What this file is not: it starts nothing; it holds no collective beyond the one reduction helper.
"""

from __future__ import annotations

import torch

# A CPU placement's workers and engines: no GPU visible (torch, vLLM and DeepSpeed's accelerator
# detection all follow it), DeepSpeed on its CPU accelerator (gloo).
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def on_gpu(placement) -> bool:
    return placement.gpus_per_node > 0


def worker_env(placement) -> dict[str, str]:
    """Environment a role's worker (or engine) process starts with, from the placement."""
    return dict(CPU_ONLY_ENV) if not on_gpu(placement) else {}


def hide_gpus_here() -> None:
    """Hide the GPUs from this process, for an in-process worker of a CPU placement (LocalGroup). Only
    possible before CUDA is initialised: after that the devices stay visible whatever the environment
    says, so that case is an error rather than a worker quietly on cuda:0."""
    import os

    from rlhf_system.config import ConfigError

    if torch.cuda.is_initialized():
        raise ConfigError("placement.gpus_per_node=0 but this process already uses CUDA, so its in-process worker "
                          "cannot run on CPU only. Fix: placement.gpus_per_node=<GPUs per node>, or "
                          "placement.launcher=ray (workers start with the GPUs hidden)")
    os.environ.update(CPU_ONLY_ENV)


def dist_backend(gpu: bool) -> str:
    return "nccl" if gpu else "gloo"


def all_reduce_max(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`all_reduce_sum`'s twin for the maximum (counts the ranks must agree on)."""
    import torch.distributed as dist

    x = t.to(device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.to(t.device)


def all_reduce_sum(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Sum `t` over the default process group, reduced on `device` (the rank's engine device), and
    return the result on `t`'s own device. NCCL only maps CUDA tensors: a CPU tensor reduced on an
    NCCL group fails ("No backend type associated with device type cpu"), so loss sums and counts
    travel to the engine's device for the reduction."""
    import torch.distributed as dist

    x = t.to(device)
    dist.all_reduce(x)
    return x.to(t.device)
