"""`rlhf bench sft`: SFT throughput and peak memory for packing on/off and ZeRO stages 2 and 3, as JSON.

    rlhf bench sft --config configs/sft/tiny-cpu.yaml --steps 5 [overrides]

Each variant starts a fresh Ray WorkerGroup (so each worker's peak memory belongs to that variant),
runs one warm-up step, then times `--steps` optimiser steps. tokens/s counts real (non-padding)
input tokens over all ranks; trained_tokens/s counts the tokens that carry the loss. Peak memory is
the maximum over ranks, and each rank's: CUDA max allocated on GPU, the process's peak RSS on CPU. This is a
benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import time

from rlhf_system.config import RunConfig, validate
from rlhf_system.data.batching import global_batches

VARIANTS = [{"packing": p, "zero_stage": z} for z in (2, 3) for p in (False, True)]


def bench_variant(cfg: RunConfig, steps: int) -> dict:
    from rlhf_system.placement.group import WorkerGroup
    from rlhf_system.trainers import sft
    from rlhf_system.workers.sft import SFTWorker

    sft.prepare(cfg)
    group = WorkerGroup("actor", SFTWorker, cfg.placement.actor, cfg.placement)
    try:
        n = group.call("setup", cfg)[0]["train_samples"]
        batches = global_batches(n, cfg.train.global_batch_size, cfg.seed, 0)
        if len(batches) < steps + 1:
            raise ValueError(f"only {len(batches)} global batches; lower --steps or train.global_batch_size")
        group.call("train_step", batches[0], 0)  # warm-up: allocator, kernels, first-touch costs
        t0 = time.perf_counter()
        tokens = trained = 0
        for step in range(1, steps + 1):
            m = group.call("train_step", batches[step], step)[0]
            tokens += m["input_tokens"]
            trained += m["tokens"]
        seconds = time.perf_counter() - t0
        peaks = group.call("peak_memory_mb")
        nodes = [node for node, _ in group.call("where")]
    finally:
        group.shutdown()
    return {"packing": cfg.data.packing, "zero_stage": cfg.deepspeed.zero_stage, "workers": cfg.placement.actor,
            "steps": steps, "step_s": round(seconds / steps, 4), "tokens_per_s": round(tokens / seconds, 1),
            "trained_tokens_per_s": round(trained / seconds, 1), "peak_memory_mb": round(max(peaks), 1),
            "peak_memory_mb_by_rank": [round(p, 1) for p in peaks], "nodes": nodes}


def run(cfg: RunConfig, steps: int) -> list[dict]:
    from rlhf_system.placement.group import ensure_ray

    ensure_ray(int(cfg.placement.actor * cfg.placement.cpus_per_worker))
    results = []
    for variant in VARIANTS:
        vcfg = cfg.model_copy(deep=True)
        vcfg.data.packing = variant["packing"]
        vcfg.deepspeed.zero_stage = variant["zero_stage"]
        vcfg.placement.launcher = "ray"
        results.append(bench_variant(validate(vcfg), steps))
    return results
