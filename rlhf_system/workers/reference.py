"""ReferenceWorker: the frozen reference policy of the KL term (or on-policy distillation's teacher), on
one rank. Verbs: `setup`, `logprobs`, `teacher` (GKD's teacher distributions). Inference only; ZeRO-3
sharded and CPU-offloaded when deepspeed.frozen_zero_stage / frozen_offload say so, 4-/8-bit with
model.reference_quant."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_system.data.experience import Experience
from rlhf_system.workers.actor import policy_logprobs
from rlhf_system.workers.base import BaseWorker
from rlhf_system.workers.update import RoleState


class ReferenceWorker(BaseWorker):
    def setup(self, cfg) -> dict:
        from rlhf_system.distributed.deepspeed import frozen_engine
        from rlhf_system.models.load import load_causal_lm, load_tokenizer

        tok = load_tokenizer(cfg.model)
        engine = frozen_engine(lambda: load_causal_lm(cfg.model, cfg.model.reference_path or cfg.model.path,
                                                      frozen_quant=cfg.model.reference_quant), cfg, dist.get_world_size())
        self.state = RoleState(cfg, tok, engine, dist.get_rank(), dist.get_world_size())
        return {"rank": self.rank}

    def logprobs(self, exp: Experience) -> torch.Tensor:
        return policy_logprobs(self.state, exp)

    def teacher(self, exp: Experience, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GKD's teacher side, from one forward per micro-batch: the response tokens' log-probs (B, T) (as
        `logprobs`), and the k most likely tokens (B, T, k) at each response position with their
        log-probs (B, T, k), at the sampling temperature."""
        return policy_logprobs(self.state, exp, topk=k)

    def save_checkpoint(self, path: str) -> None:
        """Frozen: nothing changes, nothing to save (the weights are model.reference_path)."""

    def load_checkpoint(self, path: str) -> None:
        pass
