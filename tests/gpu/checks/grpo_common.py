"""The GRPO runs of the grpo_* and rollout checks: configs/grpo/tiny-cpu.yaml (GRPO, rule reward) on the kit
policy, shrunk to seconds per step, loaded and validated by the CLI's own config loader."""

from __future__ import annotations

from pathlib import Path

from tests.gpu.checks.common import ON_CPU, REPO, assets

CONFIG = REPO / "configs" / "grpo" / "tiny-cpu.yaml"


def grpo_config(work: Path, name: str, *overrides: str):
    from rlhf_system.config import load_config

    a = assets(work)
    data = a["data"]
    return load_config(CONFIG, [
        f"model.path={a['policy']}", f"run_dir={work / f'run_{name}'}",
        f"data.train=[{{path: {data / 'rl_train.jsonl'}}}]", f"data.eval=[{{path: {data / 'rl_test_seen.jsonl'}}}]",
        "train.rollout_batch_size=8", "rollout.n_samples_per_prompt=4", "train.global_batch_size=32",
        "train.micro_batch_size=16", "train.max_eval_samples=8", "train.eval_every=0", "train.eval_samples=2",
        "train.eval_pass_k=[1,2]", "algorithm.kl.coef=0",  # no reference role: one GPU holds actor and engine
        "rollout.gpu_memory_utilization=0.3", "rollout.sync_timeout_s=120", "placement.call_timeout_s=180",
        "placement.timeout_s=60", "logging.console=false", "logging.plots=false", "checkpoint.export_hf=false",
        *(["rollout.max_new_tokens=8"] if ON_CPU else []), *overrides], mode="ppo")


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
