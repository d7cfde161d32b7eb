"""The first half of a PPO step, in the controller: sample the prompts' responses and score them.

    batch = sample_and_score(cfg, prep, groups, rollout, prompts, step, more_prompts, timer)

gives a `Scored` batch: per sample its prompt row, the engine's response ids and log-probs, the
finish reason, and the final score, in prompt-major order (prompt i's n samples are rows i*n ..
i*n+n-1). trainers/ppo.py turns it into an Experience.

Scores are every reward source weighted and summed (reward model, rules, remote server, DAPO's
overlong punishment), then clipped and standardised over the batch (rewards.clip, rewards.normalize).
With rollout.dynamic_sampling (DAPO), prompt groups whose samples all scored the same are dropped
and further prompts are sampled until the batch holds train.rollout_batch_size groups, for at most
rollout.dynamic_sampling_max_rounds rounds and dynamic_sampling_timeout_s seconds; a batch still
short then is completed with dropped groups (they carry no advantage), and the metrics count them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from rlhf_system.algorithms.grpo_family import informative_groups, overlong_penalty
from rlhf_system.config import RunConfig
from rlhf_system.data.samples import Sample
from rlhf_system.envs.metrics import episode_metrics
from rlhf_system.trainers import gkd
from rlhf_system.trainers.episodes import run_episodes

ROUND_SEED = 1_000_003  # seed offset of each dynamic-sampling round: disjoint from the step's first


@dataclass
class Scored:
    prompts: list[dict]          # per sample: its prompt row (prompt_ids, messages, meta)
    samples: list[Sample]        # per sample: the episode (data/samples.py)
    scores: torch.Tensor         # (B,) final scores
    metrics: dict

    def to_json(self) -> dict:
        """For a checkpoint's batches in flight (trainers/pipeline.py); float32 scores survive exactly."""
        return {"prompts": self.prompts, "samples": [s.to_json() for s in self.samples], "scores": self.scores.tolist(), "metrics": self.metrics}

    @classmethod
    def from_json(cls, d: dict) -> Scored:
        return cls(d["prompts"], [Sample.from_json(s) for s in d["samples"]], torch.tensor(d["scores"], dtype=torch.float32), d["metrics"])


def reward_parts(cfg: RunConfig, prep, groups: dict, prompts: list[dict], samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Each reward source's (B,) scores, unweighted, by metric name (`weighted_sum` has their weights),
    on each sample's last assistant turn. An episode whose environment failed (rollout.env_errors=
    end_episode) scores 0 from every source."""
    texts = [s.text for s in samples]
    items = [{"messages": p["messages"], "meta": p["meta"], "response": t} for p, t in zip(prompts, texts)]
    parts = {}
    rm_wait = groups["reward"].submit_sharded("score", items) if cfg.rewards.use_model else None
    if prep.rules is not None:
        rule = torch.tensor(prep.rules.score([json.dumps(p["messages"]) for p in prompts], texts,
                                             [p["meta"] for p in prompts]))
        parts["reward/rules"] = rule
    if prep.remote is not None:
        remote = torch.tensor(prep.remote.score([json.dumps(p["messages"]) for p in prompts], texts,
                                                [p["meta"] for p in prompts]))
        parts["reward/remote"] = remote
    if rm_wait is not None:
        parts["reward/model"] = rm_wait()
    if cfg.rewards.overlong_buffer > 0:
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        parts["reward/overlong"] = overlong_penalty(lengths, cfg.rollout.episode_tokens, cfg.rewards.overlong_buffer,
                                                    cfg.rewards.overlong_penalty)
    if cfg.rollout.env or cfg.rollout.agent:  # the turns' own rewards (an agent's: what it returned)
        parts["reward/agent" if cfg.rollout.agent else "reward/env"] = torch.tensor(
            [float(s.env_reward) for s in samples])
        failed = torch.tensor([bool(s.env_failed) for s in samples])
        parts = {k: v.float().masked_fill(failed, 0.0) for k, v in parts.items()}
    return parts


def weighted_sum(cfg: RunConfig, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    w = cfg.rewards
    weights = {"reward/rules": w.rule_weight, "reward/remote": w.remote_weight, "reward/model": w.model_weight}
    return torch.stack([weights.get(k, 1.0) * v.float() for k, v in parts.items()]).sum(0)


def finish(cfg: RunConfig, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Sum, clip and standardise the parts: (B,) scores and the parts' means."""
    metrics = {k: v.float().mean().item() for k, v in parts.items()}
    total = weighted_sum(cfg, parts)
    metrics["reward/total"] = total.mean().item()
    if cfg.rewards.clip > 0:
        total = total.clamp(-cfg.rewards.clip, cfg.rewards.clip)
    if cfg.rewards.normalize:  # per batch: scale-free rewards for the critic and the KL trade-off
        total = (total - total.mean()) / (total.std() + 1e-6)
    return total, metrics


def score(cfg: RunConfig, prep, groups: dict, rows: list[dict], samples: list[Sample], metrics: dict,
          timer: dict) -> Scored:
    """Samples generated elsewhere (partial rollouts: trainers/partial.py) -> the Scored batch."""
    t = time.perf_counter()
    scores, more = finish(cfg, reward_parts(cfg, prep, groups, rows, samples))
    timer["time/reward"] = time.perf_counter() - t
    return Scored(rows, samples, scores, more | metrics)


def sample_and_score(cfg: RunConfig, prep, groups: dict, rollout, prompts: list[dict], step: int,
                     more_prompts, timer: dict) -> Scored:
    """`more_prompts()` gives the next batch of prompt rows (dynamic sampling's refills)."""
    n, r = cfg.rollout.n_samples_per_prompt, cfg.rollout
    need = len(prompts)
    rounds = r.dynamic_sampling_max_rounds if r.dynamic_sampling else 1
    deadline = time.monotonic() + r.dynamic_sampling_timeout_s
    kept: list[tuple] = []       # (prompt row, samples, parts) per informative group
    dropped: list[tuple] = []
    timer["time/generate"] = timer["time/reward"] = 0.0
    done_rounds = 0
    for k in range(rounds):
        batch = prompts if k == 0 else more_prompts()
        t = time.perf_counter()
        seed = r.seed + 7919 * step + ROUND_SEED * k
        if gkd.uses_data(cfg):  # GKD's off-policy share: some groups take the data's response (one round)
            gen, ep_metrics = gkd.mixed_episodes(cfg, prep.tokenizer, rollout, batch, seed, step, run_episodes)
        else:
            gen, ep_metrics = run_episodes(cfg, prep.tokenizer, rollout, batch, seed, prep.env, agent=prep.agent)
        timer["time/generate"] += time.perf_counter() - t
        per_sample = [batch[i // n] for i in range(len(gen))]
        if not r.dynamic_sampling:
            return score(cfg, prep, groups, per_sample, gen, ep_metrics, timer)
        t = time.perf_counter()
        parts = reward_parts(cfg, prep, groups, per_sample, gen)
        timer["time/reward"] += time.perf_counter() - t
        done_rounds += 1
        useful = informative_groups(weighted_sum(cfg, parts), n).tolist()
        for g, ok in enumerate(useful):
            rows = slice(g * n, (g + 1) * n)
            (kept if ok else dropped).append((batch[g], gen[rows], {key: v[rows] for key, v in parts.items()}))
        if len(kept) >= need or time.monotonic() > deadline:
            break
    generated = len(kept) + len(dropped)
    chosen = (kept + dropped)[:need]  # informative groups first; dropped ones only to complete the batch
    parts = {key: torch.cat([c[2][key] for c in chosen]) for key in chosen[0][2]}
    scores, metrics = finish(cfg, parts)
    metrics |= {"dynamic_sampling/rounds": done_rounds, "dynamic_sampling/informative": len(kept) / generated,
                "dynamic_sampling/filled": max(0, need - len(kept))}
    samples = [s for c in chosen for s in c[1]]
    metrics |= episode_metrics(samples) if prep.env or prep.agent else {}
    return Scored([c[0] for c in chosen for _ in range(n)], samples, scores, metrics)
