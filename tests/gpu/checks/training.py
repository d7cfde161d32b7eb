"""The sft / rm / dpo checks: `rlhf train MODE` in this process with the shipped tiny config, on one GPU in
bf16 through the local launcher (placement.launcher=local: one in-process worker, no Ray), for
RLHF_GPU_CHECK_STEPS (20) steps. Reported: first / last training loss, steps/s after the first step,
tokens/s, peak GPU memory (torch.cuda.max_memory_allocated of this process, which holds the worker);
ok when every loss is finite and the last steps' mean is below the first steps'."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.gpu.checks import common
from tests.gpu.checks.common import REPO, STEPS, assets, gpu_overrides, metric_rows, need, rlhf


def train_check(mode: str, config: str, work: Path, data: tuple[str, str], model: str = "policy") -> dict:
    need("deepspeed")
    a = assets(work)
    run_dir = work / f"run_{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a kept work folder: no earlier run's error.log or metrics
    train, evaluate = (a["data"] / f for f in data)
    args = ["train", mode, "--config", str(REPO / config), f"model.path={a[model]}", f"run_dir={run_dir}",
            f"data.train=[{{path: {train}}}]", f"data.eval=[{{path: {evaluate}}}]", "placement.launcher=local",
            *gpu_overrides(), f"train.max_steps={STEPS}", "train.max_eval_samples=64", "logging.console=false",
            "logging.plots=false", "checkpoint.export_hf=false"]
    common.reset_peak()
    rlhf(args, run_dir, f"`rlhf train {mode}` with placement.launcher=local")
    rows = [r for r in metric_rows(run_dir) if "loss" in r]
    losses = [r["loss"] for r in rows]
    timed = [r["step_s"] for r in rows[1:]]  # the first step carries the warm-up (kernels, allocator)
    tokens = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r]
    evals = [r for r in metric_rows(run_dir) if any(k.startswith("eval_") for k in r)]
    return {
        "ok": len(losses) == STEPS and common.finite_and_down(losses),
        "steps": len(losses), "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "steps_per_s": round(len(timed) / sum(timed), 2) if timed and sum(timed) > 0 else None,
        "first_step_s": round(rows[0]["step_s"], 2) if rows else None,
        "tokens_per_s": round(sum(tokens) / len(tokens), 1) if tokens else None,
        "peak_gpu_gib": common.peak_gib(),
        "eval_loss_first_last": [round(r["eval_loss"], 4) for r in (evals[0], evals[-1]) if "eval_loss" in r],
        "dtype": "bfloat16" if common.on_gpu() else "float32",
    }
