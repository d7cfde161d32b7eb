"""RewardModelWorker: reward-model training on one rank: a scalar score per sequence, Bradley-Terry loss on
(chosen, rejected) pairs. Verbs: `setup`, `train_step`, `evaluate`, `save_hf`, `full_state_dict`;
trainers/reward_model.py (the controller) decides when. (PPO's frozen scorer is workers/reward.py.)

The model is an HF sequence classifier with one label (models/load.load_reward_model: a checkpoint
that is one, or a value head on a causal LM). It reads its score at the last non-pad token, so
sequences are right-padded. With peft the backbone gets adapters and the score head is trained in full.

Loss normalisation: every optimiser step is the mean over the WHOLE global batch's pairs, however
it is split into micro-batches and ranks, so a global batch gives the same update on 1 process or on
N, with any micro-batch size (the per-pair version of workers/sft.py's token trick).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_system.algorithms.losses import pairwise_rm_loss
from rlhf_system.config import RunConfig
from rlhf_system.data.batching import checked_total_steps
from rlhf_system.data.collate import pad_to
from rlhf_system.data.rank_data import RankData
from rlhf_system.distributed.deepspeed import grad_accum_steps, train_engine
from rlhf_system.models.export import export_model
from rlhf_system.models.load import load_reward_model, load_tokenizer
from rlhf_system.workers.base import BaseWorker
from rlhf_system.workers.supervised import (
    eval_size,
    grad_norm_of,
    optimizer_step,
    strided_shares,
    strided_sums,
)

UNIT = "preference pairs"


class RewardModelWorker(BaseWorker):
    """One rank's reward-model training: cfg, tokenizer, data (its training share and the held-out pairs), engine, total_steps."""

    def setup(self, cfg: RunConfig) -> dict:
        """Per-rank set-up inside a worker whose process group is already initialised."""
        self.cfg, self.tokenizer = cfg, load_tokenizer(cfg.model)
        self.data = RankData("preference", cfg, self.tokenizer, self.rank, self.world_size)
        self.total_steps = checked_total_steps(cfg, self.data.n_train, UNIT)
        torch.manual_seed(cfg.seed)  # identical weights (and value head init) on every rank and launch mode
        self.engine = train_engine(
            lambda: load_reward_model(cfg.model, cfg.algorithm.rm.head, self.tokenizer.pad_token_id, peft=cfg.peft),
            cfg, dp_size=self.world_size, total_steps=self.total_steps)
        return {"train_samples": self.data.n_train, "total_steps": self.total_steps}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """B pairs -> 2B right-padded rows: chosen first (rows :B), then rejected (rows B:)."""
        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        return {"input_ids": pad_to(seqs, self.tokenizer.pad_token_id),
                "attention_mask": pad_to([[1] * len(s) for s in seqs], 0)}

    def pair_rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over chosen and rejected together: (chosen (B,), rejected (B,)) scores."""
        device = self.engine.device
        rewards = self.engine(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0]
        n = rewards.shape[0] // 2
        return rewards[:n], rewards[n:]

    def pair_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Summed pairwise loss over the micro-batch's pairs, and summed (not mean) metrics."""
        chosen, rejected = self.pair_rewards(batch)
        n = chosen.shape[0]
        loss, metrics = pairwise_rm_loss(chosen, rejected, self.cfg.algorithm.rm.margin)
        return loss * n, {k: v.cpu() * n for k, v in metrics.items()}

    def train_step(self, batch_idx: list[int] | None, step: int) -> dict:
        """One optimiser step on the global batch `batch_idx` (dataset indices; None: the next from the stream)."""
        pairs = self.cfg.train.global_batch_size
        scale = grad_accum_steps(self.cfg, self.world_size) * self.world_size / pairs

        def loss_of(rows):
            batch = self.collate(rows)
            loss_sum, metrics = self.pair_loss_sum(batch)
            # loss sum, correct pairs, tokens (chosen + rejected, no padding)
            return loss_sum, torch.stack([loss_sum.detach().double().cpu(), metrics["accuracy"].double().cpu(),
                                          batch["attention_mask"].sum().double()])

        shares = self.data.micro_batches(batch_idx)
        sums = optimizer_step(self.engine, [(m.where, m.rows) for m in shares], loss_of, scale, "RM", step, self.rank)
        return {"loss": (sums[0] / pairs).item(), "accuracy": (sums[1] / pairs).item(),
                "lr": self.engine.get_lr()[0], "pairs": pairs, "tokens": int(sums[2])} | grad_norm_of(self.engine)

    def evaluate(self) -> dict:
        """Held-out pair accuracy (ties count as wrong), mean reward margin r_c - r_r and loss, each rank
        a strided share (supervised.py)."""
        if self.data.eval is None:
            return {}
        self.engine.eval()
        n = eval_size(self.cfg, len(self.data.eval))

        def score(idx: list[int]) -> torch.Tensor:  # loss sum, correct pairs, margin sum
            loss_sum, metrics = self.pair_loss_sum(self.collate([self.data.eval[i] for i in idx]))
            return torch.stack([loss_sum.float().cpu(), metrics["accuracy"], metrics["margin_mean"]])

        sums = strided_sums(self.engine, strided_shares(n, self.cfg.train.micro_batch_size, self.rank,
                                                        self.world_size), score, 3)
        self.engine.train()
        mean = (sums / max(n, 1)).tolist()
        return {"eval_loss": mean[0], "eval_accuracy": mean[1], "eval_margin": mean[2]}

    def save_hf(self, out: str | Path) -> Path:
        """A sequence-classifier folder (safetensors + tokenizer) that AutoModelForSequenceClassification loads."""
        return export_model(self.engine, self.tokenizer, out, self.cfg, task="seq_cls")
