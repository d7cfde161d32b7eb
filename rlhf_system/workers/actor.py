"""ActorWorker: the policy role of PPO / GRPO / RLOO / REINFORCE++ on one rank. Verbs: `setup`,
`logprobs` (old log-probs), `update` (the policy-gradient epochs) and `save_hf`, plus the sending
side of the weight sync (distributed/weight_sync.py has the contract). The controller
(trainers/ppo.py) decides when each runs; batches arrive as `Experience` (data/experience.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_system.algorithms import grpo_family, losses
from rlhf_system.algorithms.gkd import topk_jsd
from rlhf_system.algorithms.kl import kl_penalty
from rlhf_system.algorithms.logprobs import masked_mean, masked_sum
from rlhf_system.data.experience import Experience
from rlhf_system.workers.base import BaseWorker
from rlhf_system.workers.sequences import batched, lengths, micro_batches, policy_forward, policy_topk
from rlhf_system.workers.update import RoleState, one_optimizer_step, run_update, temperature


class ActorWorker(BaseWorker):
    def setup(self, cfg, total_steps: int) -> dict:
        from rlhf_system.distributed.deepspeed import train_engine
        from rlhf_system.models.load import load_causal_lm, load_tokenizer

        tok = load_tokenizer(cfg.model)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (LoRA init is random)
        engine = train_engine(lambda: load_causal_lm(cfg.model, peft=cfg.peft), cfg, dist.get_world_size(), total_steps)
        self.state = RoleState(cfg, tok, engine, dist.get_rank(), dist.get_world_size())
        self.engine = engine
        return {"rank": self.rank}

    def logprobs(self, exp: Experience) -> torch.Tensor:
        """(B, T) response log-probs under the current policy (no dropout: what vLLM sampled from)."""
        return policy_logprobs(self.state, exp)

    def update(self, exp: Experience, step: int, kl_coef: float) -> dict:
        return actor_update(self.state, exp, step, kl_coef)

    def save_hf(self, out: str) -> str:
        from rlhf_system.models.export import export_model

        return str(export_model(self.state.engine, self.state.tokenizer, out, self.state.cfg))

    # ------------------------------------------------- weight sync, sender side (weight_sync.py)
    _ws = None  # this rank's weight_sync.ActorSender: made by ws_open (rank 0) or the first other verb

    def _sender(self):
        from rlhf_system.distributed.weight_sync import ActorSender

        if self._ws is None:  # ranks > 0 never open: they connect (colocated) or only gather
            self._ws = ActorSender(self.rank, self.state.cfg)
        return self._ws

    def ws_open(self, world: int, backend: str) -> tuple[str, int, list]:
        self.ws_close()
        return self._sender().open(self.state.engine.module, world, backend, self.node_address())

    def ws_connect(self, addr: str, port: int, backend: str, world: int, receivers: list[int]) -> int:
        return self._sender().connect(addr, port, backend, world, receivers)

    def ws_send(self, plan: list) -> dict:
        """Every actor rank calls this (ZeRO-3 gathers are collective). The plan comes from the controller
        because only rank 0 ran `ws_open`."""
        return self._sender().send(self.state.engine.module, plan, self.state.engine.device)

    def ws_close(self) -> None:
        if self._ws is not None:
            self._ws.close()
        self._ws = None


def policy_logprobs(state: RoleState, exp: Experience, topk: int = 0):
    """Response log-probs (B, T) of a frozen-for-now policy (actor old log-probs, reference log-probs).
    topk > 0 (GKD's teacher): also its k most likely tokens (B, T, k) at each response position and their
    log-probs (B, T, k), from the same forward."""
    cfg = state.cfg
    t, flat = temperature(cfg), cfg.train.flat(cfg.model.attn_implementation)
    state.engine.eval()
    parts = micro_batches(cfg.train, lengths(exp), state.engine.device, state.world)
    if topk:
        return batched(lambda b: policy_topk(state.engine, b, topk, t, flat=flat), exp, parts)
    return batched(lambda b: policy_forward(state.engine, b, t, flat=flat)[0], exp, parts)


POLICY_LOSSES = {"ppo": losses.policy_loss_ppo, "gspo": grpo_family.policy_loss_gspo,
                 "cispo": grpo_family.policy_loss_cispo}


def is_weights(a, old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token importance weights for the sampler/trainer gap (algorithm.is_mode): truncated or masked."""
    rollout = rollout.to(old.device)
    if a.is_mode == "mask":
        return losses.masked_is_weights(old, rollout, a.is_low, a.tis_cap, mask)
    return losses.truncated_is_weights(old, rollout, a.tis_cap, mask)


def actor_update(state: RoleState, exp: Experience, step: int, kl_coef: float) -> dict:
    a = state.cfg.algorithm
    t = temperature(state.cfg)
    if exp.old_logprobs is None and not one_optimizer_step(state.cfg):
        raise ValueError("actor update: old log-probs are missing but this step makes several optimiser steps")

    norm_len = state.cfg.rollout.episode_tokens  # Dr. GRPO's constant (loss_agg=seq_sum_norm): the budget
    flat = state.cfg.train.flat(state.cfg.model.attn_implementation)

    def loss_fn(batch: Experience):
        dev = state.engine.device
        mask = batch.policy_mask.to(dev)
        gkd = batch.teacher_ids is not None
        out = policy_forward(state.engine, batch, t, with_entropy=a.entropy_coef > 0, flat=flat,
                             at_ids=batch.teacher_ids if gkd else None)
        lp, ent = out[0], out[1]
        # One optimiser step per rollout: the policy is still the rollout-time one, so its own
        # log-probs, detached, are the old ones (the ratio is 1 in value, its gradient is the PG's).
        old = batch.old_logprobs.to(dev) if batch.old_logprobs is not None else lp.detach()
        metrics = {}
        if batch.rollout_logprobs is not None and state.cfg.rollout.temperature > 0:
            rollout = batch.rollout_logprobs.to(dev)
            metrics["logprob_mismatch"] = masked_mean((old - rollout).abs(), mask).item()
        is_w = is_weights(a, old, batch.rollout_logprobs, mask) if a.tis_cap > 0 else None
        if is_w is not None and a.is_mode == "mask":
            metrics["is_masked"] = (1 - masked_mean(is_w, mask)).item()
        loss, pg_metrics = POLICY_LOSSES[a.policy_loss](
            lp, old, batch.advantages.to(dev), mask, clip_eps=a.clip_eps, clip_eps_high=a.clip_eps_high or None,
            agg=a.loss_agg, is_weights=is_w, norm_len=norm_len, **({"dual_clip": a.dual_clip or None}
                                                                    if a.policy_loss == "ppo" else {}))
        metrics |= pg_metrics
        metrics["pg_loss"] = loss.item()
        if gkd:  # GKD (algorithm.distill.loss=gkd): on every row, sampled by the student or not
            jsd = topk_jsd(batch.teacher_logprobs.to(dev), out[2], a.distill.beta)
            distill = losses.aggregate_loss(jsd, mask, a.loss_agg, norm_len)
            loss = loss + a.distill.coef * distill
            metrics["gkd_loss"] = distill.item()
        if ent is not None:
            entropy = masked_mean(ent, mask)
            loss = loss - a.entropy_coef * entropy
            metrics["entropy"] = entropy.item()
        if batch.ref_logprobs is not None:
            ref = batch.ref_logprobs.to(dev)
            # per-sequence k1 KL of the rollout policy, in nats (the controller's `kl` when it skipped
            # the old-log-prob forward)
            metrics["kl_seq"] = masked_sum(kl_penalty(old, ref, "k1", mask), mask, dim=-1).mean().item()
            if not a.kl.in_reward and kl_coef > 0:
                kl, _ = losses.kl_loss(lp, ref, mask, a.kl.estimator, a.loss_agg, norm_len)
                loss = loss + kl_coef * kl
                metrics["kl_loss"] = kl.item()
        return loss, metrics

    return run_update(state, exp, step, "actor", loss_fn)
