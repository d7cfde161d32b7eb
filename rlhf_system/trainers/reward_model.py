"""Reward-model training: a scalar score per sequence, Bradley-Terry loss on (chosen, rejected) pairs.

    rlhf train rm --config configs/rm/tiny-cpu.yaml [overrides]

`run` is the controller and reads top to bottom: prepare (paths, head, tokenisation, before any
worker starts) -> start the reward group -> train (trainers/loop.py: global batches of PAIRS, each
rank takes its share as micro-batches; checkpoints and resume) -> evaluate (held-out pair accuracy,
margin, loss) -> save (HF format). The per-rank work is workers/reward_model.py's RewardModelWorker:
in-process (LocalGroup) or as Ray actors (WorkerGroup).

The model is an HF sequence classifier with one label, whichever `algorithm.rm.head` says:
- "classifier": `model.path` already is one (e.g. the kit's reward/ folder, or an earlier RM export).
- "value_head": `model.path` is a causal LM (the kit's policy/ folder, an SFT export). Loading it
  through AutoModelForSequenceClassification keeps the backbone, drops the LM head and initialises a
  fresh linear `score` head (hidden -> 1): a value head on the causal LM. The export is then an
  ordinary sequence classifier, which the PPO reward role loads as it is.
The classifier reads its score at the last non-pad token, so `config.pad_token_id` is set from the
tokenizer and sequences are right-padded. With peft (LoRA / QLoRA) the backbone gets adapters and the
score head is trained in full (PEFT's SEQ_CLS task keeps it in `modules_to_save`); the export merges
them (models/export.py).

Loss normalisation: every optimiser step is the mean over the WHOLE global batch's pairs, however
it is split into micro-batches and ranks, so a global batch gives the same update on 1 process or on
N, with any micro-batch size (the per-pair version of workers/sft.py's token trick).
"""

from __future__ import annotations

from rlhf_system.config import RunConfig
from rlhf_system.data.batching import checked_total_steps
from rlhf_system.data.build import run_datasets
from rlhf_system.models.load import load_tokenizer
from rlhf_system.trainers.loop import train_with_group
from rlhf_system.trainers.preflight import preflight_model
from rlhf_system.workers.reward_model import UNIT


def prepare(cfg: RunConfig) -> int:
    """Controller-side checks and tokenisation (cached), before any worker starts. Returns steps."""
    tokenizer = load_tokenizer(cfg.model)  # fails fast on a bad path
    preflight_model(cfg)
    train_ds, _, stats = run_datasets("preference", cfg, tokenizer)  # a stream: its first rows are checked
    return checked_total_steps(cfg, None if cfg.data.streaming else len(train_ds), UNIT, stats.identical_pairs)


def run(cfg: RunConfig) -> dict:
    """The whole reward-model run, as the controller sees it; returns the final metrics."""
    from rlhf_system.workers.reward_model import RewardModelWorker

    steps = prepare(cfg)  # every data / path error surfaces here, before workers start
    return train_with_group(cfg, steps, "reward", RewardModelWorker, cfg.placement.reward)
