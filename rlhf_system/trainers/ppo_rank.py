"""Per-rank work of the PPO roles: set-up, experience forwards, and the actor / critic updates.

The workers (workers/actor.py, critic.py, reference.py, reward.py) hold a `RoleState` and call these;
the controller (trainers/ppo.py) decides when. Every function takes this rank's shard only.

Mini- and micro-batches: a rank holds experiences / dp samples. One optimiser step consumes
train.global_batch_size samples across ranks, i.e. global / dp per rank, fed as micro-batches of
train.micro_batch_size; DeepSpeed's gradient accumulation (global / (dp * micro) steps, the same
arithmetic as SFT) makes the optimiser step at the mini-batch boundary. Each of the
algorithm.ppo_epochs passes visits the shard in a fresh seeded order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlhf_system.algorithms import losses
from rlhf_system.algorithms.logprobs import masked_mean
from rlhf_system.config import RunConfig
from rlhf_system.distributed.deepspeed import frozen_engine, train_engine
from rlhf_system.eval.reward_score import score_conversations
from rlhf_system.models.load import load_causal_lm, load_tokenizer
from rlhf_system.trainers.experience import (
    batched,
    collate_sequences,
    micro_slices,
    pad_floats,
    policy_forward,
    value_forward,
)


@dataclass
class RoleState:
    cfg: RunConfig
    tokenizer: object
    engine: object
    rank: int
    world: int


def _head(path: str) -> str:
    from transformers import AutoConfig

    archs = AutoConfig.from_pretrained(path).architectures or []
    return "classifier" if any(a.endswith("ForSequenceClassification") for a in archs) else "value_head"


def critic_init_path(cfg: RunConfig) -> str:
    """model.critic_path, else the reward model when it shares the policy's tokenizer (the critic reads
    the policy's token ids), else the policy with a fresh value head."""
    if cfg.model.critic_path:
        return cfg.model.critic_path
    if cfg.model.reward_path and cfg.rewards.use_model and _same_vocab(cfg):
        return cfg.model.reward_path
    return cfg.model.path


def _same_vocab(cfg: RunConfig) -> bool:
    from transformers import AutoTokenizer

    policy = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
    reward = AutoTokenizer.from_pretrained(cfg.model.reward_path)
    return policy.get_vocab() == reward.get_vocab()


def temperature(cfg: RunConfig) -> float:
    # Log-probs are taken at the sampling temperature so that trainer and vLLM agree; greedy -> 1.
    return cfg.rollout.temperature or 1.0


# ------------------------------------------------------------------------------------------ setup
def setup_actor(cfg: RunConfig, total_steps: int) -> RoleState:
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (LoRA init is random)
    engine = train_engine(load_causal_lm(cfg.model, peft=cfg.peft), cfg, dist.get_world_size(), total_steps)
    return RoleState(cfg, tok, engine, dist.get_rank(), dist.get_world_size())


def setup_critic(cfg: RunConfig, total_steps: int) -> RoleState:
    from rlhf_system.trainers.reward_model import load_reward_model

    tok = load_tokenizer(cfg.model)
    path = critic_init_path(cfg)
    torch.manual_seed(cfg.seed)
    model = load_reward_model(cfg.model, _head(path), tok.pad_token_id, path=path)
    engine = train_engine(model, cfg, dist.get_world_size(), total_steps, lr=cfg.optim.critic_lr)
    return RoleState(cfg, tok, engine, dist.get_rank(), dist.get_world_size())


def setup_reference(cfg: RunConfig) -> RoleState:
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, cfg.model.reference_path or cfg.model.path, frozen_quant=cfg.model.reference_quant)
    return RoleState(cfg, tok, frozen_engine(model, cfg, dist.get_world_size()), dist.get_rank(), dist.get_world_size())


def setup_reward(cfg: RunConfig) -> RoleState:
    from rlhf_system.trainers.reward_model import load_reward_model

    rm_cfg = cfg.model.model_copy(update={"path": cfg.model.reward_path, "tokenizer_path": ""})
    tok = load_tokenizer(rm_cfg)  # the reward model's own tokenizer: it may differ from the policy's
    model = load_reward_model(rm_cfg, "classifier", tok.pad_token_id, frozen_quant=cfg.model.reward_quant)
    return RoleState(cfg, tok, frozen_engine(model, cfg, dist.get_world_size()), dist.get_rank(), dist.get_world_size())


# -------------------------------------------------------------------------------------- forwards
def logprobs(state: RoleState, samples: list[dict]) -> list[list[float]]:
    """Response-token log-probs (actor: old log-probs; reference: reference log-probs)."""
    t = temperature(state.cfg)
    state.engine.eval()  # no dropout: the same function vLLM samples from
    return batched(lambda b: policy_forward(state.engine, b, t)[0], samples, state.tokenizer.pad_token_id,
                   state.cfg.train.micro_batch_size)


def values(state: RoleState, samples: list[dict]) -> list[list[float]]:
    state.engine.eval()
    return batched(lambda b: value_forward(state.engine, b), samples, state.tokenizer.pad_token_id,
                   state.cfg.train.micro_batch_size)


@torch.no_grad()
def reward_scores(state: RoleState, items: list[dict]) -> list[float]:
    """Reward-model scores of {"messages": prompt turns, "response": text} items. The conversation is
    rendered with the reward model's tokenizer and template, exactly as in reward-model training, so
    the policy and the reward model need not share a tokenizer."""
    return score_conversations(state.engine, state.tokenizer, items, state.cfg.data.template,
                               state.cfg.train.micro_batch_size)


# --------------------------------------------------------------------------------------- updates
def _padded(samples: list[dict], key: str) -> torch.Tensor:
    return pad_floats([s[key] for s in samples])


def _order(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


def _check_finite(loss: torch.Tensor, role: str, step: int, idx: list[int]) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"{role}: non-finite loss {loss.item()} at PPO step {step}, "
                                 f"rank {dist.get_rank()} experiences {idx[:8]}{'...' if len(idx) > 8 else ''}")


def _update(state: RoleState, samples: list[dict], step: int, role: str, loss_fn) -> dict:
    """The shared epoch / mini-batch / micro-batch walk; `loss_fn(batch, part) -> (loss, metrics)`."""
    cfg = state.cfg
    micro = cfg.train.micro_batch_size
    mini = cfg.train.global_batch_size // state.world
    sums: dict[str, float] = {}
    count = 0
    state.engine.train()
    for epoch in range(cfg.algorithm.ppo_epochs):
        order = _order(len(samples), cfg.seed * 1000003 + step * 101 + epoch)
        for m0 in range(0, len(order), mini):
            for sl in micro_slices(min(mini, len(order) - m0), micro):
                idx = order[m0 + sl.start:m0 + sl.stop]
                part = [samples[i] for i in idx]
                batch = collate_sequences(part, state.tokenizer.pad_token_id)
                loss, metrics = loss_fn(batch, part)
                _check_finite(loss, role, step, idx)
                state.engine.backward(loss)
                state.engine.step()
                for k, v in {"loss": loss.item(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
    return {f"{role}/{k}": v / max(1, count) for k, v in sums.items()} | {
        f"{role}/lr": state.engine.get_lr()[0]}


def actor_update(state: RoleState, samples: list[dict], step: int, kl_coef: float) -> dict:
    a = state.cfg.algorithm
    t = temperature(state.cfg)

    def loss_fn(batch, part):
        dev = state.engine.device
        mask = batch["response_mask"].to(dev)
        lp, ent = policy_forward(state.engine, batch, t, with_entropy=a.entropy_coef > 0)
        old = _padded(part, "old_logprobs").to(dev)
        is_w = None
        if a.tis_cap > 0:
            is_w = losses.truncated_is_weights(old, _padded(part, "rollout_logprobs").to(dev), a.tis_cap)
        loss, metrics = losses.policy_loss_ppo(
            lp, old, _padded(part, "advantages").to(dev), mask, clip_eps=a.clip_eps,
            clip_eps_high=a.clip_eps_high or None, dual_clip=a.dual_clip or None, agg=a.loss_agg, is_weights=is_w)
        metrics["pg_loss"] = loss.item()
        if ent is not None:
            entropy = masked_mean(ent, mask)
            loss = loss - a.entropy_coef * entropy
            metrics["entropy"] = entropy.item()
        if not a.kl.in_reward and kl_coef > 0:
            kl, _ = losses.kl_loss(lp, _padded(part, "ref_logprobs").to(dev), mask, a.kl.estimator, a.loss_agg)
            loss = loss + kl_coef * kl
            metrics["kl_loss"] = kl.item()
        return loss, metrics

    return _update(state, samples, step, "actor", loss_fn)


def critic_update(state: RoleState, samples: list[dict], step: int) -> dict:
    a = state.cfg.algorithm

    def loss_fn(batch, part):
        dev = state.engine.device
        v = value_forward(state.engine, batch)
        loss, metrics = losses.value_loss(v, _padded(part, "old_values").to(dev), _padded(part, "returns").to(dev),
                                          batch["response_mask"].to(dev), clip=a.value_clip, agg=a.loss_agg)
        return a.vf_coef * loss, metrics

    return _update(state, samples, step, "critic", loss_fn)
