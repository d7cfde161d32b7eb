"""CriticWorker: the value model of PPO (trainable, under DeepSpeed). Initialised from model.critic_path,
else the reward model, else the policy with a fresh value head (trainers/ppo_rank.py). Not started by
the critic-free estimators (GRPO, RLOO, REINFORCE++)."""

from __future__ import annotations

from rlhf_system.workers.base import BaseWorker


class CriticWorker(BaseWorker):
    def ppo_setup(self, cfg, total_steps: int) -> dict:
        from rlhf_system.trainers import ppo_rank

        self.state = ppo_rank.setup_critic(cfg, total_steps)
        return {"rank": self.rank}

    def values(self, samples: list[dict]) -> list[list[float]]:
        from rlhf_system.trainers import ppo_rank

        return ppo_rank.values(self.state, samples)

    def ppo_update(self, samples: list[dict], step: int) -> dict:
        from rlhf_system.trainers import ppo_rank

        return ppo_rank.critic_update(self.state, samples, step)
