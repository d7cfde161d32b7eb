"""The PPO controller's held-out evaluation: greedy and sampled episodes on every held-out set, scored
by the rule rewards per family and the reward model, and, when distilling, the student's reverse KL to
the teacher."""

from __future__ import annotations

import math

import torch

from rlhf_system.algorithms.logprobs import masked_mean
from rlhf_system.config import RunConfig
from rlhf_system.trainers.episodes import run_episodes
from rlhf_system.trainers.role_calls import experience_of, in_turn_or_together, sharded


def evaluate(cfg: RunConfig, prep, groups: dict, rollout) -> dict:
    """Every held-out set, two ways: greedy completions (what a user of the model sees) and
    train.eval_samples samples at the rollout temperature with a fixed seed (the policy's expected reward,
    which is the quantity RL maximises, with mean@n and pass@k of exact match). Rule metrics per family
    (eval/generation.score) and, with a reward model, its mean score on the greedy completions."""
    from rlhf_system.eval.generation import sampled_score
    from rlhf_system.eval.generation import score as rule_score

    out = {}
    for name, rows in prep.evals.items():
        # episodes, as in training: with an environment the policy may call its tools here too
        gen, env_metrics = run_episodes(cfg, prep.tokenizer, rollout, rows, None, prep.env, n=1, temperature=0.0,
                                        agent=prep.agent)
        texts = [g.text for g in gen]
        out |= {f"eval/{name}/{k}": v for k, v in env_metrics.items()}
        per_family = rule_score([r["meta"] for r in rows], texts)
        for fam, m in per_family.items():
            for k in ("exact", "reward"):
                out[f"eval/{name}/{fam}/{k}"] = m[k]
        if cfg.rollout.temperature > 0:
            k_n = cfg.train.eval_samples
            sampled, env_metrics = run_episodes(cfg, prep.tokenizer, rollout, rows, cfg.seed + 12345, prep.env, n=k_n,
                                                agent=prep.agent)
            out |= {f"eval/{name}/sampled/{k}": v for k, v in env_metrics.items()}
            s_texts = [g.text for g in sampled]
            s_rows = [rows[i // k_n]["meta"] for i in range(len(sampled))]
            for fam, m in rule_score(s_rows, s_texts).items():
                for k in ("exact", "reward"):
                    out[f"eval/{name}/sampled/{fam}/{k}"] = m[k]
            for fam, m in sampled_score([r["meta"] for r in rows], s_texts, k_n, cfg.train.eval_pass_k).items():
                out |= {f"eval/{name}/sampled/{fam}/{k}": v for k, v in m.items()}
            if cfg.algorithm.estimator == "opd":
                out[f"eval/{name}/sampled/distill/reverse_kl"] = held_out_reverse_kl(
                    cfg, prep, groups, [rows[i // k_n]["prompt_ids"] for i in range(len(sampled))], sampled)
        if cfg.rewards.use_model:
            items = [{"messages": r["messages"], "response": t} for r, t in zip(rows, texts)]
            k = len(groups["reward"].workers)
            usable = len(items) - len(items) % k
            rm = groups["reward"].call_sharded("score", items[:usable])
            out[f"eval/{name}/rm_score"] = rm.mean().item() if len(rm) else 0.0
    return out


def held_out_reverse_kl(cfg: RunConfig, prep, groups: dict, prompt_ids: list, samples: list) -> float:
    """The student's per-token reverse KL to the teacher on its own held-out samples (the k1 estimate,
    log pi_student - log pi_teacher at the sampled tokens, averaged over the policy's tokens): what
    on-policy distillation drives down, measured on prompts it never trained on. Samples past a multiple
    of the ranks are left out, so that every rank gets an equal share."""
    exp = experience_of(prompt_ids, samples, prep.tokenizer.pad_token_id)
    k = math.lcm(groups["actor"].world_size, groups["reference"].world_size)
    exp = exp.select(torch.arange(len(exp) - len(exp) % k))
    got = in_turn_or_together(cfg, {"old": lambda: sharded(cfg, groups["actor"], "logprobs", exp),
                                    "ref": lambda: sharded(cfg, groups["reference"], "logprobs", exp)})
    return masked_mean(got["old"] - got["ref"], exp.policy_mask).item()
