"""Check `rollout_tokens_per_s`: generation throughput of vLLM vs Hugging Face `generate`, same dtype (bf16),
same prompts (32 of the synthetic RL prompts, tokenised by the project's prompt pipeline), 128 new tokens
each, sampled at the GRPO config's temperature.

HF: rlhf_system.bench.ppo.hf_tokens_per_s, the HF half of `rlhf bench ppo` (its vLLM half needs the run's
Ray groups, so it is not used here). vLLM: an in-process vllm.LLM built with the arguments the rollout
engines use (workers/rollout.py: the training dtype, rollout.enforce_eager, gpu_memory_utilization) and
driven by models/generate.vllm_generate. Without vllm the HF half runs alone and the line says so.
ok when every half that ran generated tokens; the figures are for reading, not asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.gpu.checks.common import ON_CPU, gpu_overrides, main, missing, need, peak_gib, reset_peak
from tests.gpu.checks.grpo_common import grpo_config

PROMPTS = 8 if ON_CPU else 32
NEW_TOKENS = 16 if ON_CPU else 128


def prompt_ids(cfg) -> list[list[int]]:
    from rlhf_system.data.build import build_dataset
    from rlhf_system.models.load import load_tokenizer

    tok = load_tokenizer(cfg.model)
    ds = build_dataset("prompt", cfg.data, cfg.data.train, tok, cfg.seed)[0]
    return [ds[i]["prompt_ids"] for i in range(PROMPTS)]


def vllm_tokens_per_s(cfg, ids: list[list[int]]) -> dict:
    import os

    from vllm import LLM

    from rlhf_system.models.generate import shutdown_vllm, vllm_generate

    r = cfg.rollout
    kwargs = {"enable_chunked_prefill": False} if ON_CPU else {"gpu_memory_utilization": r.gpu_memory_utilization}
    if ON_CPU:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(r.cpu_kv_cache_gib))
    t = time.perf_counter()
    llm = LLM(model=cfg.model.path, dtype=cfg.train_dtype(), enforce_eager=r.enforce_eager or ON_CPU,
              max_model_len=cfg.data.max_prompt_len + NEW_TOKENS, seed=r.seed, **kwargs)
    start_s = time.perf_counter() - t
    try:
        vllm_generate(llm, ids[:2], 4, r.temperature, seed=0)  # warm-up
        t = time.perf_counter()
        outs = vllm_generate(llm, ids, NEW_TOKENS, r.temperature, n=1, seed=1)
        seconds = time.perf_counter() - t
        dtype = str(llm.llm_engine.model_config.dtype).replace("torch.", "")
    finally:
        shutdown_vllm(llm)
    tokens = sum(len(o[0]) for o in outs)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "dtype": dtype, "enforce_eager": r.enforce_eager or ON_CPU, "engine_start_s": round(start_s, 1)}


def check(work: Path) -> dict:
    need()  # a GPU
    from rlhf_system.bench.ppo import hf_tokens_per_s

    # the hybrid placement only so that the config validates on one GPU; nothing is placed here
    cfg = grpo_config(work, "rollout", *gpu_overrides(), "placement.colocate=[[actor, rollout]]",
                      f"rollout.max_new_tokens={NEW_TOKENS}")
    ids = prompt_ids(cfg)
    reset_peak()
    hf = hf_tokens_per_s(cfg, ids, 1)
    hf["dtype"] = "bfloat16" if hf["device"] == "cuda" else "float32"  # as hf_tokens_per_s loads it
    hf["peak_gpu_gib"] = peak_gib()
    why_not = missing("vllm")
    vl = {"skipped": "; ".join(why_not)} if why_not else vllm_tokens_per_s(cfg, ids)
    ran = [x for x in (hf, vl) if "skipped" not in x]
    return {
        "ok": all(x["tokens"] > 0 for x in ran), "ran": ["hf_generate"] + ([] if why_not else ["vllm"]),
        "prompts": len(ids), "max_new_tokens": NEW_TOKENS, "temperature": cfg.rollout.temperature,
        "hf_generate": hf, "vllm": vl,
        "vllm_over_hf": round(vl["tokens_per_s"] / hf["tokens_per_s"], 2) if not why_not else None,
    }


if __name__ == "__main__":
    raise SystemExit(main("rollout_tokens_per_s", check))
