"""CriticWorker: the value model of PPO (trainable, under DeepSpeed) on one rank. Verbs: `setup`,
`values`, `update`. Initialised from model.critic_path, else the reward model (when it shares the
policy's tokenizer: the critic reads the policy's token ids), else the policy with a fresh value
head. Not started by the critic-free estimators (GRPO, RLOO, REINFORCE++)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_system.algorithms import losses
from rlhf_system.config import RunConfig
from rlhf_system.data.experience import Experience
from rlhf_system.workers.base import BaseWorker
from rlhf_system.workers.sequences import batched, lengths, micro_batches, value_forward
from rlhf_system.workers.update import RoleState, run_update


def _head(path: str) -> str:
    from transformers import AutoConfig

    archs = AutoConfig.from_pretrained(path).architectures or []
    return "classifier" if any(a.endswith("ForSequenceClassification") for a in archs) else "value_head"


def critic_init_path(cfg: RunConfig) -> str:
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


class CriticWorker(BaseWorker):
    def setup(self, cfg, total_steps: int) -> dict:
        from rlhf_system.distributed.deepspeed import train_engine
        from rlhf_system.models.load import load_reward_model, load_tokenizer

        tok = load_tokenizer(cfg.model)
        path = critic_init_path(cfg)
        torch.manual_seed(cfg.seed)
        engine = train_engine(lambda: load_reward_model(cfg.model, _head(path), tok.pad_token_id, path=path), cfg,
                              dist.get_world_size(), total_steps, lr=cfg.optim.critic_lr)
        self.state = RoleState(cfg, tok, engine, dist.get_rank(), dist.get_world_size())
        self.engine = engine
        return {"rank": self.rank}

    def values(self, exp: Experience) -> torch.Tensor:
        """(B, T) values V(s_t) before each response token."""
        state, cfg = self.state, self.state.cfg
        flat = cfg.train.flat(cfg.model.attn_implementation)
        state.engine.eval()
        parts = micro_batches(cfg.train, lengths(exp), state.engine.device, state.world)
        return batched(lambda b: value_forward(state.engine, b, flat=flat), exp, parts)

    def update(self, exp: Experience, step: int) -> dict:
        a = self.state.cfg.algorithm
        flat = self.state.cfg.train.flat(self.state.cfg.model.attn_implementation)

        def loss_fn(batch: Experience):
            dev = self.state.engine.device
            v = value_forward(self.state.engine, batch, flat=flat)
            loss, metrics = losses.value_loss(v, batch.values.to(dev), batch.returns.to(dev),
                                              batch.policy_mask.to(dev), clip=a.value_clip, agg=a.loss_agg,
                                              norm_len=self.state.cfg.rollout.episode_tokens)
            return a.vf_coef * loss, metrics

        return run_update(self.state, exp, step, "critic", loss_fn)
