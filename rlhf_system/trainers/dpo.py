"""Direct preference optimisation (DPO, and its IPO / cDPO / RPO variants) under DeepSpeed.

    rlhf train dpo --config configs/dpo/tiny-cpu.yaml [overrides]

`run` is the controller and reads top to bottom: prepare (model and reference paths, tokenisation of
the pairs, before any worker starts) -> start the actor group -> train (global batches of pairs; each
rank takes its share as micro-batches) -> evaluate (held-out log-prob margin, implicit-reward accuracy)
-> save (HF format). The per-rank work is workers/dpo.py's DPOWorker, in-process (LocalGroup) or as
Ray actors (WorkerGroup).

The two models per rank (policy and frozen reference), live or precomputed reference log-probs and
the loss normalisation are described in workers/dpo.py.
"""

from __future__ import annotations

from rlhf_system.config import RunConfig
from rlhf_system.data.batching import checked_total_steps
from rlhf_system.data.build import run_datasets
from rlhf_system.models.load import load_tokenizer
from rlhf_system.trainers.loop import train_with_group
from rlhf_system.trainers.preflight import preflight_model
from rlhf_system.workers.dpo import UNIT


def prepare(cfg: RunConfig) -> int:
    """Controller-side checks and tokenisation (cached), before any worker starts. Returns steps."""
    tokenizer = load_tokenizer(cfg.model)  # fails fast on a bad path
    preflight_model(cfg)
    train_ds, _, stats = run_datasets("preference", cfg, tokenizer)  # a stream: its first rows are checked
    return checked_total_steps(cfg, None if cfg.data.streaming else len(train_ds), UNIT, stats.identical_pairs)


def run(cfg: RunConfig) -> dict:
    """The whole DPO run, as the controller sees it; returns the final metrics."""
    from rlhf_system.workers.dpo import DPOWorker

    steps = prepare(cfg)  # every data / path error surfaces here, before workers start
    return train_with_group(cfg, steps, "actor", DPOWorker, cfg.placement.actor)
