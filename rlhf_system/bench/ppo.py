"""`rlhf bench ppo`: where a PPO step's time goes, rollout throughput vLLM vs HF generate, weight-sync
speed and memory, as JSON.

    rlhf bench ppo --config configs/ppo/tiny-cpu.yaml --steps 3 [overrides]

It starts the run's worker groups and rollout engines exactly as `rlhf train ppo` does, runs one
warm-up step and then `--steps` timed PPO steps (the real ones: rollout, reward, inference, advantages,
updates, sync), and reports the mean seconds and share of each phase. Then, on the same prompts with
the same sampling settings, it times generation through the vLLM engines and through Hugging Face
`generate` (one process, in this controller, on the device it has), counting generated tokens. Weight
sync: the bytes the plan moves per sync over the mean sync seconds, and the rise in memory the last
sync needed on the actor and on the engines (distributed/memory.py), beside the model's bytes. A
benchmark, not a test: nothing here asserts a speed. On a shared or small machine the figures move
with the load; compare runs made on the same machine.
"""

from __future__ import annotations

import time

import torch

from rlhf_system.config import RunConfig
from rlhf_system.tracking import TIME_PHASES


def plan_bytes(plan) -> int:
    return sum(m.nbytes for bucket in plan for m in bucket)


def hf_tokens_per_s(cfg: RunConfig, prompt_ids: list[list[int]], n: int) -> dict:
    """Sampled generation with transformers on this process's device: same prompts, n, temperature."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_system.models.generate import hf_generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype).to(device).eval()
    batch = [p for p in prompt_ids for _ in range(n)]
    hf_generate(model, tok, batch[:2], 4, cfg.rollout.temperature)  # warm-up
    t = time.perf_counter()
    outs = hf_generate(model, tok, batch, cfg.rollout.max_new_tokens, cfg.rollout.temperature)
    seconds = time.perf_counter() - t
    tokens = sum(len(o) for o in outs)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "device": device}


def _over(rise: int | None, model_bytes: int) -> float | None:
    """An engine's memory during a sync as a multiple of the model's bytes: its weights plus the rise
    (target: 1 + one bucket / model, issue 12)."""
    return None if rise is None else round((model_bytes + rise) / model_bytes, 3)


def run(cfg: RunConfig, steps: int, compare_hf: bool = True) -> dict:
    """The benchmark's JSON document; `compare_hf=False` skips the Hugging Face generate comparison
    (`rlhf bench scale` measures placements, not generation back ends)."""
    from rlhf_system.algorithms.kl import make_kl_controller
    from rlhf_system.trainers import ppo

    prep = ppo.prepare(cfg)
    if prep.train.per_epoch is not None and prep.train.per_epoch < steps + 1:
        raise ValueError(f"only {prep.train.per_epoch} rollout batches of prompts; lower --steps or "
                         "train.rollout_batch_size")
    a = cfg.algorithm
    kl_ctl = make_kl_controller(a.kl.coef, a.kl.adaptive, a.kl.target, a.kl.horizon)
    groups, shared, rollout, sync = ppo.start(cfg, prep)
    try:
        timings: list[dict] = []
        with ppo.pipeline(cfg, prep, groups, rollout, 0, steps + 1) as pipe:  # as training runs: async with
            for step in range(steps + 1):                                     # train.max_staleness > 0
                batch = pipe.take(step)
                metrics = ppo.learn(cfg, prep, groups, sync, pipe, batch, step, kl_ctl.value)
                if step:  # step 0: warm-up, not counted
                    timings.append(metrics)
        # Rollout throughput on one fixed prompt batch, vLLM first (its engines are up).
        prompt_ids = [p["prompt_ids"] for p in prep.train.next()]
        n = cfg.rollout.n_samples_per_prompt
        t = time.perf_counter()
        gen = rollout.generate(prompt_ids, seed=cfg.rollout.seed)
        v_seconds = time.perf_counter() - t
        v_tokens = sum(len(g.response_ids) for g in gen)
        sync_bytes = plan_bytes(sync.plan)
        sync_memory = dict(sync.memory)  # the last timed sync's
        ranks = {role: {"peak_memory_mb": [round(m, 1) for m in g.call("peak_memory_mb")],
                        "nodes": [node for node, _ in g.call("where")]} for role, g in groups.items()}
        ranks["rollout"] = {"nodes": [node for node, _ in rollout.call("where")]}
    finally:
        ppo.stop(groups, shared, rollout, sync)
    # After the engines are gone: they no longer hold the cores.
    hf = hf_tokens_per_s(cfg, prompt_ids, n) if compare_hf else None

    mean = {k: sum(t[k] for t in timings) / len(timings) for k in (*TIME_PHASES, "time/step", "tokens")}
    step_s = mean["time/step"]
    sync_s = mean["time/sync"]
    return {
        "benchmark": "ppo", "model": cfg.model.path, "estimator": a.estimator, "roles": sorted(groups),
        "engines": cfg.rollout.num_engines, "prompts_per_step": cfg.train.rollout_batch_size,
        "samples_per_prompt": n, "max_new_tokens": cfg.rollout.max_new_tokens, "steps": steps,
        "step_s": round(step_s, 4), "tokens_per_s": round(mean["tokens"] / step_s, 1),
        "phases": {k.split("/")[1]: {"seconds": round(mean[k], 4), "share": round(mean[k] / step_s, 4)}
                   for k in TIME_PHASES},
        "rollout": {"prompts": len(prompt_ids), "samples": len(gen),
                    "vllm": {"seconds": round(v_seconds, 3), "tokens": v_tokens,
                             "tokens_per_s": round(v_tokens / v_seconds, 1)},
                    "hf_generate": hf},
        "weight_sync": {"bytes": sync_bytes, "seconds": round(sync_s, 4),
                        "bytes_per_s": round(sync_bytes / sync_s, 1) if sync_s > 0 else None,
                        "buckets": len(sync.plan), "bucket_bytes": cfg.rollout.sync_bucket_bytes,
                        **sync_memory, "engine_peak_over_model": _over(sync_memory["engine_peak_rise_bytes"], sync_bytes)},
        "ranks": ranks,  # per role: each rank's peak memory (MB: CUDA max allocated, or peak RSS) and node
    }
