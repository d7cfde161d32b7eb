"""RewardWorker: the reward role. For reward-model training (`rlhf train rm`) it trains a sequence
classifier with the pairwise loss (trainers/reward_model.py holds the per-rank logic; checkpoint verbs
come from BaseWorker); the PPO work adds its `score` verb here."""

from __future__ import annotations

from rlhf_system.workers.base import BaseWorker


class RewardWorker(BaseWorker):
    def rm_setup(self, cfg) -> dict:
        from rlhf_system.trainers import reward_model

        self.state = reward_model.setup_rank(cfg)
        return {"train_samples": len(self.state.train_ds), "total_steps": self.state.total_steps}

    def rm_step(self, batch_idx: list[int], step: int) -> dict:
        from rlhf_system.trainers import reward_model

        return reward_model.train_step(self.state, batch_idx, step)

    def rm_evaluate(self) -> dict:
        from rlhf_system.trainers import reward_model

        return reward_model.evaluate(self.state)

    def save_hf(self, out: str) -> str:
        from rlhf_system.trainers import reward_model

        return str(reward_model.save_hf(self.state, out))

    def full_state_dict(self) -> dict:
        """Full parameters on CPU (gathered under ZeRO-3), for equivalence tests on tiny models."""
        from rlhf_system.trainers import reward_model

        return reward_model.full_state_dict(self.state)
