"""RewardWorker: PPO's frozen reward model on one rank. Verbs: `setup`, `score`. (Training a reward
model is workers/reward_model.py's RewardModelWorker.)"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_system.workers.base import BaseWorker
from rlhf_system.workers.update import RoleState


class RewardWorker(BaseWorker):
    def setup(self, cfg) -> dict:
        from rlhf_system.distributed.deepspeed import frozen_engine
        from rlhf_system.models.load import load_reward_model, load_tokenizer

        rm_cfg = cfg.model.model_copy(update={"path": cfg.model.reward_path, "tokenizer_path": ""})
        tok = load_tokenizer(rm_cfg)  # the reward model's own tokenizer: it may differ from the policy's
        engine = frozen_engine(lambda: load_reward_model(rm_cfg, "classifier", tok.pad_token_id,
                                                         frozen_quant=cfg.model.reward_quant), cfg, dist.get_world_size())
        self.state = RoleState(cfg, tok, engine, dist.get_rank(), dist.get_world_size())
        return {"rank": self.rank}

    @torch.no_grad()
    def score(self, items: list[dict]) -> torch.Tensor:
        """(B,) reward-model scores of {"messages": prompt turns, "response": text} items. The
        conversation is rendered with the reward model's tokenizer and template, exactly as in
        reward-model training, so the policy and the reward model need not share a tokenizer."""
        from rlhf_system.models.reward_score import score_conversations

        s = self.state
        return torch.tensor(score_conversations(s.engine, s.tokenizer, items, s.cfg.data.template,
                                                s.cfg.train.micro_batch_size))

    def save_checkpoint(self, path: str) -> None:
        """Frozen: nothing to save."""

    def load_checkpoint(self, path: str) -> None:
        pass
