"""ReferenceWorker: the frozen reference policy of the KL term. Inference only; ZeRO-3 sharded and
CPU-offloaded when deepspeed.frozen_zero_stage / frozen_offload say so."""

from __future__ import annotations

from rlhf_system.workers.base import BaseWorker


class ReferenceWorker(BaseWorker):
    def ppo_setup(self, cfg) -> dict:
        from rlhf_system.trainers import ppo_rank

        self.state = ppo_rank.setup_reference(cfg)
        return {"rank": self.rank}

    def logprobs(self, samples: list[dict]) -> list[list[float]]:
        from rlhf_system.trainers import ppo_rank

        return ppo_rank.logprobs(self.state, samples)

    def save_checkpoint(self, path: str) -> None:
        """Frozen: nothing changes, nothing to save (the weights are model.reference_path)."""

    def load_checkpoint(self, path: str) -> None:
        pass
