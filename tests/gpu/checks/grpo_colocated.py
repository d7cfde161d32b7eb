"""Check `grpo_colocated`: the hybrid engine on one GPU. 2 GRPO steps of the kit policy through
rlhf_system.trainers.ppo.run with placement.colocate=[[actor, rollout]], placement.gpus_per_node=1: the vLLM
engine shares the actor's GPU, sleeps while the actor trains, and gets the weights as CUDA-IPC handles.

Reported: the hybrid metrics of each step from run_dir/metrics.jsonl (free GPU memory after the engine's
sleep, after its weights wake, after its KV cache wakes; bytes the sync put on a socket), the peak memory
in use on the GPU (nvidia-smi: the Ray workers' and the engine's processes), and the time per step. ok
when the run finished its steps and every sync moved under 64 KiB over sockets (handles, not weights).
Needs ray, vllm and deepspeed."""

from __future__ import annotations

from pathlib import Path

from tests.gpu.checks.common import DeviceMemory, gpu_overrides, main, metric_rows, need
from tests.gpu.checks.grpo_common import grpo_config, shutdown_ray

STEPS = 2
WIRE_LIMIT = 64 * 1024
KEYS = ("hybrid/free_gib_after_sleep", "hybrid/free_gib_after_wake_weights", "hybrid/free_gib_after_wake_kv_cache",
        "hybrid/sync_wire_bytes")


def check(work: Path) -> dict:
    need("ray", "vllm", "deepspeed")
    from rlhf_system.trainers import ppo

    cfg = grpo_config(work, "grpo_colocated", *gpu_overrides(), "placement.colocate=[[actor, rollout]]",
                      f"train.max_steps={STEPS}")
    try:
        with DeviceMemory() as mem:
            result = ppo.run(cfg)
    finally:
        shutdown_ray()
    steps = [r for r in metric_rows(cfg.run_dir) if "time/step" in r]
    per_step = {k: [r.get(k) for r in steps] for k in KEYS}
    wire = [w for w in per_step["hybrid/sync_wire_bytes"] if w is not None]
    return {
        "ok": result.get("steps") == STEPS and len(wire) == STEPS and max(wire) < WIRE_LIMIT,
        "steps": result.get("steps"),
        **{k.split("/", 1)[1]: [None if v is None else round(v, 3) for v in vs] for k, vs in per_step.items()},
        "wire_limit_bytes": WIRE_LIMIT,
        "peak_gpu_used_gib": None if mem.peak_mib is None else round(mem.peak_mib / 1024, 2),
        "step_s": [round(r["time/step"], 2) for r in steps],
        "sync_s": [round(r["time/sync"], 3) for r in steps if "time/sync" in r],
        "sleep_s": [round(r["time/sleep"], 3) for r in steps if "time/sleep" in r],
    }


if __name__ == "__main__":
    raise SystemExit(main("grpo_colocated", check))
