"""ActorWorker: the policy role. Verbs by mode: sft_* (next-token loss, trainers/sft.py) and dpo_*
(preference loss against a frozen reference held in the same worker, trainers/dpo.py); the PPO verbs
join it with the PPO work. The per-rank logic lives in the trainer modules; this class only holds
the state between calls."""

from __future__ import annotations

from rlhf_system.workers.base import BaseWorker


class ActorWorker(BaseWorker):
    def sft_setup(self, cfg) -> dict:
        from rlhf_system.trainers import sft

        self.state = sft.setup_rank(cfg)
        return {"train_samples": len(self.state.train_ds), "total_steps": self.state.total_steps}

    def sft_step(self, batch_idx: list[int], step: int) -> dict:
        from rlhf_system.trainers import sft

        return sft.train_step(self.state, batch_idx, step)

    def sft_evaluate(self) -> dict:
        from rlhf_system.trainers import sft

        return sft.evaluate(self.state)

    def save_hf(self, out: str) -> str:
        from rlhf_system.trainers import sft

        return str(sft.save_hf(self.state, out))

    def full_state_dict(self) -> dict:
        """Full parameters on CPU (gathered under ZeRO-3), for equivalence tests on tiny models."""
        from rlhf_system.trainers import sft

        return sft.full_state_dict(self.state)

    def dpo_setup(self, cfg) -> dict:
        from rlhf_system.trainers import dpo

        self.state = dpo.setup_rank(cfg)
        return {"train_samples": len(self.state.train_ds), "total_steps": self.state.total_steps}

    def dpo_step(self, batch_idx: list[int], step: int) -> dict:
        from rlhf_system.trainers import dpo

        return dpo.train_step(self.state, batch_idx, step)

    def dpo_evaluate(self) -> dict:
        from rlhf_system.trainers import dpo

        return dpo.evaluate(self.state)
