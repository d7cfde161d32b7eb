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

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rlhf_system.algorithms.losses import pairwise_rm_loss
from rlhf_system.config import RunConfig
from rlhf_system.data.batching import checked_total_steps, rank_micro_batches
from rlhf_system.data.build import run_datasets
from rlhf_system.data.collate import pad_to
from rlhf_system.distributed.deepspeed import gathered_state_dict, grad_accum_steps, train_engine
from rlhf_system.models.export import export_model
from rlhf_system.models.load import load_reward_model, load_tokenizer
from rlhf_system.workers.base import BaseWorker

UNIT = "preference pairs"


@dataclass
class RMState:
    cfg: RunConfig
    tokenizer: object
    train_ds: object
    eval_ds: object | None
    engine: object
    rank: int
    world: int
    total_steps: int


def setup_rank(cfg: RunConfig) -> RMState:
    """Per-rank set-up inside a worker whose process group is already initialised."""
    tokenizer = load_tokenizer(cfg.model)
    train_ds, eval_ds = run_datasets("preference", cfg, tokenizer)  # cache hits
    rank, world = dist.get_rank(), dist.get_world_size()
    total = checked_total_steps(cfg, len(train_ds), UNIT)
    torch.manual_seed(cfg.seed)  # identical weights (and value head init) on every rank and launch mode
    model = load_reward_model(cfg.model, cfg.algorithm.rm.head, tokenizer.pad_token_id, peft=cfg.peft)
    engine = train_engine(model, cfg, dp_size=world, total_steps=total)
    return RMState(cfg, tokenizer, train_ds, eval_ds, engine, rank, world, total)


def collate(state: RMState, rows: list[dict]) -> dict[str, torch.Tensor]:
    """B pairs -> 2B right-padded rows: chosen first (rows :B), then rejected (rows B:)."""
    seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    return {"input_ids": pad_to(seqs, state.tokenizer.pad_token_id),
            "attention_mask": pad_to([[1] * len(s) for s in seqs], 0)}


def pair_rewards(state: RMState, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected together: (chosen (B,), rejected (B,)) scores."""
    device = state.engine.device
    rewards = state.engine(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0]
    n = rewards.shape[0] // 2
    return rewards[:n], rewards[n:]


def pair_loss_sum(state: RMState, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Summed pairwise loss over the micro-batch's pairs, and summed (not mean) metrics."""
    chosen, rejected = pair_rewards(state, batch)
    n = chosen.shape[0]
    loss, metrics = pairwise_rm_loss(chosen, rejected, state.cfg.algorithm.rm.margin)
    return loss * n, {k: v.cpu() * n for k, v in metrics.items()}


def train_step(state: RMState, batch_idx: list[int], step: int) -> dict:
    cfg = state.cfg
    shares = rank_micro_batches(batch_idx, state.rank, state.world, cfg.train.micro_batch_size)
    # DeepSpeed divides each micro loss by the accumulation steps and averages gradients over
    # ranks; scaling by gas * world undoes both, leaving sum(pair losses) / pairs of the global batch.
    pairs = len(batch_idx)
    scale = grad_accum_steps(cfg, state.world) * state.world / pairs
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct pairs, tokens (chosen + rejected, no padding)
    for mb in shares:
        batch = collate(state, [state.train_ds[i] for i in mb])
        loss_sum, metrics = pair_loss_sum(state, batch)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite RM loss at step {step}, rank {state.rank}, pairs {mb} "
                                     f"(dataset indices): {loss_sum.item()}. Fix: lower optim.lr or check the data")
        state.engine.backward(loss_sum * scale)
        state.engine.step()
        sums += torch.stack([loss_sum.detach().float().cpu(), metrics["accuracy"],
                             batch["attention_mask"].sum().float()])
    dist.all_reduce(sums)
    out = {"loss": (sums[0] / pairs).item(), "accuracy": (sums[1] / pairs).item(),
           "lr": state.engine.get_lr()[0], "pairs": pairs, "tokens": int(sums[2])}
    grad_norm = state.engine.get_global_grad_norm()  # before clipping; ZeRO 1-3 report it, stage 0 does not
    if grad_norm is not None:
        out["grad_norm"] = float(grad_norm)
    return out


@torch.no_grad()
def evaluate(state: RMState) -> dict:
    """Held-out pair accuracy (ties count as wrong), mean reward margin r_c - r_r and loss, each rank
    a strided share, reduced over ranks.

    Every rank runs the same number of forwards (a rank past the end scores pair 0 and discards it):
    under ZeRO-3 each forward is a collective, and unequal counts would hang.
    """
    if state.eval_ds is None:
        return {}
    state.engine.eval()
    n = len(state.eval_ds)
    if state.cfg.train.max_eval_samples:
        n = min(n, state.cfg.train.max_eval_samples)
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct pairs, margin sum
    mb = state.cfg.train.micro_batch_size
    for k in range(-(-n // (mb * state.world))):
        start = (k * state.world + state.rank) * mb
        idx = list(range(start, min(start + mb, n)))
        loss_sum, metrics = pair_loss_sum(state, collate(state, [state.eval_ds[i] for i in idx or [0]]))
        if idx:
            sums += torch.stack([loss_sum.float().cpu(), metrics["accuracy"], metrics["margin_mean"]])
    dist.all_reduce(sums)
    state.engine.train()
    mean = (sums / max(n, 1)).tolist()
    return {"eval_loss": mean[0], "eval_accuracy": mean[1], "eval_margin": mean[2]}


def save_hf(state: RMState, out: str | Path) -> Path:
    """A sequence-classifier folder (safetensors + tokenizer) that AutoModelForSequenceClassification loads."""
    return export_model(state.engine, state.tokenizer, out, state.cfg, task="seq_cls")


def full_state_dict(state: RMState) -> dict[str, torch.Tensor]:
    return gathered_state_dict(state.engine, state.cfg.deepspeed.zero_stage)


class RewardModelWorker(BaseWorker):
    def setup(self, cfg) -> dict:
        self.state = setup_rank(cfg)
        return {"train_samples": len(self.state.train_ds), "total_steps": self.state.total_steps}

    def train_step(self, batch_idx: list[int], step: int) -> dict:
        return train_step(self.state, batch_idx, step)

    def evaluate(self) -> dict:
        return evaluate(self.state)

    def save_hf(self, out: str) -> str:
        return str(save_hf(self.state, out))

    def full_state_dict(self) -> dict:
        """Full parameters on CPU (gathered under ZeRO-3), for equivalence tests on tiny models."""
        return full_state_dict(self.state)
