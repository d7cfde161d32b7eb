"""The PPO update walk a trained role runs on its shard: epochs, mini-batches, micro-batches.

Used by workers/actor.py and workers/critic.py, each with its own loss. A rank holds experiences /
dp rows. One optimiser step consumes train.global_batch_size rows across ranks, i.e. global / dp per
rank, fed as micro-batches (workers/sequences.micro_batches: train.micro_batch_size rows sorted by
length, or token-budget micro-batches whose count varies per mini-batch). The walk marks DeepSpeed's
gradient-accumulation boundary itself, on the mini-batch's last micro-batch, so the optimiser steps
there whatever the count. Each of the algorithm.ppo_epochs passes visits the shard in a fresh seeded
order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlhf_system.config import RunConfig
from rlhf_system.data.experience import Experience
from rlhf_system.distributed.devices import all_reduce_sum
from rlhf_system.workers.sequences import lengths, micro_batches


@dataclass
class RoleState:
    cfg: RunConfig
    tokenizer: object
    engine: object
    rank: int
    world: int


def temperature(cfg: RunConfig) -> float:
    # Log-probs are taken at the sampling temperature so that trainer and vLLM agree; greedy -> 1.
    return cfg.rollout.temperature or 1.0


def one_optimizer_step(cfg: RunConfig) -> bool:
    """True when a PPO step makes exactly one optimiser step (one epoch, one mini-batch): the policy
    then has not changed since the rollout when the update runs, so the old log-probs ARE the update's
    own forward, detached, and the separate old-log-prob forward can be skipped."""
    experiences = cfg.train.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    return cfg.algorithm.ppo_epochs == 1 and experiences == cfg.train.global_batch_size


def _order(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


def _check_finite(loss: torch.Tensor, role: str, step: int, batch: Experience) -> None:
    if not math.isfinite(loss.item()):
        idx = batch.index.tolist() if batch.index is not None else []
        raise FloatingPointError(f"{role}: non-finite loss {loss.item()} at PPO step {step}, "
                                 f"rank {dist.get_rank()} experiences {idx[:8]}{'...' if len(idx) > 8 else ''}")


def run_update(state: RoleState, exp: Experience, step: int, role: str, loss_fn) -> dict:
    """The epoch / mini-batch / micro-batch walk; `loss_fn(micro: Experience) -> (loss, metrics)`.
    Metrics are means over micro-batches, prefixed with the role."""
    cfg = state.cfg
    mini = cfg.train.global_batch_size // state.world
    tokens = lengths(exp)
    # DeepSpeed averages gradients over ranks (the loss is not divided by the accumulation steps:
    # scale_wrt_gas=False); world undoes that, so weighting each micro-batch's mean by its share of the
    # mini-batch (tokens, or rows for agg=seq, counted over all ranks) gives the mini-batch's global mean,
    # whatever the micro-batch split, the length grouping or the number of ranks.
    kept = exp.policy_mask.sum(-1)
    units = (kept if cfg.algorithm.loss_agg == "token" else (kept > 0)).double()
    sums: dict[str, float] = {}
    count = 0
    state.engine.train()
    for epoch in range(cfg.algorithm.ppo_epochs):
        order = torch.tensor(_order(len(exp), cfg.seed * 1000003 + step * 101 + epoch))
        minis = [order[m0:m0 + mini] for m0 in range(0, len(order), mini)]
        totals = torch.stack([units[rows].sum() for rows in minis])
        if dist.is_initialized() and state.world > 1:
            totals = all_reduce_sum(totals, state.engine.device)
        for rows, total in zip(minis, totals):
            parts = micro_batches(cfg.train, tokens[rows], state.engine.device, state.world)
            for i, part in enumerate(parts):
                picked = rows[part]
                batch = exp.select(picked)
                loss, metrics = loss_fn(batch)
                _check_finite(loss, role, step, batch)
                share = float(units[picked].sum() / total.clamp(min=1))
                state.engine.set_gradient_accumulation_boundary(i == len(parts) - 1)
                state.engine.backward(loss * share * state.world, scale_wrt_gas=False)
                state.engine.step()
                for k, v in {"loss": loss.item(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
    return {f"{role}/{k}": v / max(1, count) for k, v in sums.items()} | {
        f"{role}/lr": state.engine.get_lr()[0]}
