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

    # ---------------------------------------------------------------- PPO (trainers/ppo_rank.py)
    def ppo_setup(self, cfg, total_steps: int) -> dict:
        from rlhf_system.trainers import ppo_rank

        self.state = ppo_rank.setup_actor(cfg, total_steps)
        return {"rank": self.rank}

    def logprobs(self, samples: list[dict]) -> list[list[float]]:
        from rlhf_system.trainers import ppo_rank

        return ppo_rank.logprobs(self.state, samples)

    def ppo_update(self, samples: list[dict], step: int, kl_coef: float) -> dict:
        from rlhf_system.trainers import ppo_rank

        return ppo_rank.actor_update(self.state, samples, step, kl_coef)

    def ppo_save_hf(self, out: str) -> str:
        from rlhf_system.models.export import export_model

        return str(export_model(self.state.engine, self.state.tokenizer, out, self.state.cfg))

    # ------------------------------------------------- weight sync, sender side (weight_sync.py)
    def ws_open(self, world: int) -> tuple[str, int, list]:
        from rlhf_system.distributed import weight_sync

        self._ws_plan = weight_sync.plan_buckets([s.meta for s in weight_sync.sources(self.state.engine.module)])
        self._ws_addr, self._ws_port = self.master_endpoint()
        self._ws_world = world
        return self._ws_addr, self._ws_port, self._ws_plan

    def ws_connect(self) -> int:
        from rlhf_system.distributed import weight_sync

        self._ws_backend = weight_sync.backend_for_device()
        self._ws_group, self._ws_store = weight_sync.make_group(
            self._ws_backend, self._ws_addr, self._ws_port, 0, self._ws_world,
            self.state.cfg.placement.call_timeout_s, is_master=True)
        return 0

    def ws_send(self, plan: list) -> int:
        """Every actor rank calls this (ZeRO-3 gathers are collective); rank 0 broadcasts. The plan
        comes from the controller because only rank 0 ran `ws_open`."""
        from rlhf_system.distributed import weight_sync

        n = 0
        stage = self.state.cfg.deepspeed.zero_stage
        for buf in weight_sync.iter_buckets(self.state.engine.module, plan, stage, self.rank == 0):
            if buf is not None:
                weight_sync.broadcast(self._ws_group, self._ws_backend, buf.contiguous())
                n += 1
        return n

    def ws_close(self) -> None:
        self._ws_group = self._ws_store = None
