"""Check `grpo_nccl`: weight-sync parity over NCCL to a separate vLLM engine (rollout.sync_backend=nccl).

The run's groups start as `rlhf train ppo` starts them (trainers/ppo.prepare + ppo.start: the actor group under
DeepSpeed, the rollout engine, the weight-sync group opened). Then, as tests/integration/test_weight_sync.py
measures parity: the engine samples responses, the actor takes two real PPO updates at a high learning rate
(so its weights move away from the engine's), the engine scores the responses before the sync (the control:
must differ by > 1e-2) and after it; reported the max and mean |log-prob engine - actor| after the sync,
ok when the max is < 1e-3 (bf16). Also the sync's seconds and bytes.

Needs 2 GPUs: an engine not colocated with the actor takes a whole GPU of its own (the placement has no
fractional GPUs outside placement.colocate, and colocated engines sync through CUDA IPC, not NCCL; NCCL
also refuses two ranks on one device). Needs ray, vllm and deepspeed.
"""

from __future__ import annotations

from pathlib import Path

from tests.gpu.checks.common import ON_CPU, main, need
from tests.gpu.checks.grpo_common import grpo_config, shutdown_ray

TOL = 1e-3
CONTROL = 1e-2
WHY_2_GPUS = ("the actor and a separate vLLM engine each take a whole GPU: fractional GPUs exist only in "
              "placement.colocate, whose engines sync by CUDA IPC, not NCCL")


def _rows(t, exp) -> list[list[float]]:
    return [t[b, :int(n)].tolist() for b, n in enumerate(exp.response_lens)]


def _diffs(a: list[list[float]], b: list[list[float]]) -> list[float]:
    return [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]


def check(work: Path) -> dict:
    need("ray", "vllm", "deepspeed", gpus=2, why_gpus=WHY_2_GPUS)
    import torch

    from rlhf_system.data.experience import Experience
    from rlhf_system.trainers import ppo

    # CPU mode (plumbing only): the same steps over gloo, which the NCCL branch shares all but the transport with
    placement = ["placement.gpus_per_node=0", "model.dtype=float32", "rollout.sync_backend=gloo"] if ON_CPU else [
        "placement.gpus_per_node=2", "model.dtype=bfloat16", "rollout.sync_backend=nccl"]
    cfg = grpo_config(work, "grpo_nccl", *placement, "optim.lr=3e-3", "rollout.temperature=1.0", "train.max_steps=2")
    prep = ppo.prepare(cfg)
    groups, shared, rollout, sync = ppo.start(cfg, prep)
    try:
        actor = groups["actor"]
        prompt_ids = [p["prompt_ids"] for p in prep.train.next()]
        gen = rollout.generate(prompt_ids, n=2, temperature=1.0, seed=1)
        prompts = [prompt_ids[i // 2] for i in range(len(gen))]
        responses = [g.response_ids for g in gen]
        samples = Experience.from_rollout(prompts, responses, prep.tokenizer.pad_token_id)
        g = torch.Generator().manual_seed(0)
        for step in range(2):  # real PPO updates with arbitrary advantages: the weights move
            old = actor.call_sharded("logprobs", samples)
            signs = torch.randint(0, 2, (len(samples), 1), generator=g).float() * 2 - 1
            exp = samples.with_fields(old_logprobs=old, rollout_logprobs=old, advantages=signs * samples.response_mask)
            actor.call_sharded("update", exp, step, 0.0)
        trained = _rows(actor.call_sharded("logprobs", samples), samples)
        before = _diffs(rollout.call("score_sequences", prompts, responses)[0], trained)
        seconds = sync.sync()
        after = _diffs(rollout.call("score_sequences", prompts, responses)[0], trained)
        plan_bytes = sum(m.nbytes for bucket in sync.plan for m in bucket)
        backends = sorted({w.get("backend") for w in sync.received})
    finally:
        ppo.stop(groups, shared, rollout, sync)
        shutdown_ray()
    return {
        "ok": max(after) < TOL and max(before) > CONTROL, "max_abs_diff_after_sync": float(f"{max(after):.3g}"),
        "mean_abs_diff_after_sync": float(f"{sum(after) / len(after):.3g}"), "tolerance": TOL,
        "max_abs_diff_before_sync": round(max(before), 4), "tokens_compared": len(after),
        "sync_s": round(seconds, 3), "sync_bytes": plan_bytes, "sync_backends": backends, "dtype": cfg.train_dtype(),
    }


if __name__ == "__main__":
    raise SystemExit(main("grpo_nccl", check))
