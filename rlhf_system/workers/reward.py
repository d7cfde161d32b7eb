"""RewardWorker: the reward role. For reward-model training (`rlhf train rm`) it trains a sequence
classifier with the pairwise loss (trainers/reward_model.py holds the per-rank logic; checkpoint verbs
come from BaseWorker); in PPO it is frozen and `score`s (prompt, response) pairs."""

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

    # ---------------------------------------------------------------- PPO: frozen scorer
    def ppo_setup(self, cfg) -> dict:
        from rlhf_system.trainers import ppo_rank

        self.state = ppo_rank.setup_reward(cfg)
        self._frozen = True
        return {"rank": self.rank}

    def score(self, items: list[dict]) -> list[float]:
        from rlhf_system.trainers import ppo_rank

        return ppo_rank.reward_scores(self.state, items)

    def save_checkpoint(self, path: str) -> None:
        if not getattr(self, "_frozen", False):
            super().save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        if not getattr(self, "_frozen", False):
            super().load_checkpoint(path)
