"""Instruction tuning (SFT): next-token loss on assistant tokens only, under DeepSpeed.

    rlhf train sft --config configs/sft/tiny-cpu.yaml [overrides]

`run` is the controller and reads top to bottom: prepare (paths, tokenisation, before any worker
starts) -> start the actor group -> train (global batches; each rank takes its share as
micro-batches) -> evaluate (held-out loss, perplexity) -> save (HF format). The per-rank work is
workers/sft.py's SFTWorker: in-process (LocalGroup) or as Ray actors (WorkerGroup).
"""

from __future__ import annotations

from rlhf_system.config import RunConfig
from rlhf_system.data.batching import checked_total_steps
from rlhf_system.data.build import run_datasets
from rlhf_system.models.load import load_tokenizer
from rlhf_system.trainers.loop import train_with_group
from rlhf_system.trainers.preflight import preflight_model
from rlhf_system.workers.sft import UNIT


def prepare(cfg: RunConfig) -> int:
    """Controller-side checks and tokenisation (cached), before any worker starts. Returns steps."""
    tokenizer = load_tokenizer(cfg.model)  # fails fast on a bad path
    preflight_model(cfg)
    train_ds, _, _ = run_datasets("sft", cfg, tokenizer)  # a stream: its first rows are checked
    return total_steps(cfg, None if cfg.data.streaming else len(train_ds))


def total_steps(cfg: RunConfig, n_train: int | None) -> int:
    return checked_total_steps(cfg, n_train, UNIT)


def run(cfg: RunConfig) -> dict:
    """The whole SFT run, as the controller sees it; returns the final metrics."""
    from rlhf_system.workers.sft import SFTWorker

    steps = prepare(cfg)  # every data / path error surfaces here, before workers start
    return train_with_group(cfg, steps, "actor", SFTWorker, cfg.placement.actor)
