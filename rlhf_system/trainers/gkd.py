"""GKD's mix of on- and off-policy data (algorithm.distill.loss=gkd with on_policy < 1): each step, a
seeded share of the prompt groups is answered by the student (sampled by the engines, as always) and the
rest by the prompt record's reference response (data.keys.response), which the student did not sample.
Both kinds of rows then train on GKD's divergence to the teacher (workers/actor.py, algorithms/gkd.py);
the off-policy rows carry no policy-gradient advantage (trainers/ppo.py zeroes it).

Agarwal et al. 2024 (GKD) mix per batch with probability lambda; here the draw is per prompt group, with
a seed fixed by the run's seed, the step and the group, so a resumed run draws the same. An off-policy
group holds its reference response n times (rollout.n_samples_per_prompt): the batch keeps its shape
and every group its weight.
"""

from __future__ import annotations

import dataclasses
import random

from rlhf_system.config import RunConfig
from rlhf_system.data.samples import Sample
from rlhf_system.data.sources import DataError


def uses_data(cfg: RunConfig) -> bool:
    """Whether some prompt groups train on the data's responses instead of the student's samples."""
    d = cfg.algorithm.distill
    return cfg.algorithm.estimator == "opd" and d.loss == "gkd" and d.on_policy < 1


def off_policy_groups(cfg: RunConfig, step: int, groups: int) -> list[bool]:
    """For each of a step's prompt groups, whether it takes the data's response (probability 1 - lambda)."""
    lam = cfg.algorithm.distill.on_policy
    return [random.Random(f"{cfg.seed}/gkd/{step}/{g}").random() >= lam for g in range(groups)]


def reference_response(tokenizer, template: str, row: dict, key: str, max_new_tokens: int,
                       where: str = "") -> Sample:
    """The prompt row's reference response as the student would have produced it: the tokens the chat
    template puts after the prompt's generation prompt, up to and including the end-of-turn (eos) token
    where the engine would stop, cut at the generation budget."""
    from rlhf_system.data.tokenize import render_conversation, render_prompt

    response = row["meta"].get(key)
    where = where or f"prompt {str(row['messages'])[:80]!r}"
    if not isinstance(response, str) or not response:
        raise DataError(f"{where}: algorithm.distill.on_policy < 1 trains on each prompt's reference response, but "
                        f"the record has no '{key}' text. Fix: add it (data.keys.response names the key)")
    head = render_prompt(tokenizer, row["messages"], template)
    full = render_conversation(tokenizer, row["messages"] + [{"role": "assistant", "content": response}], template)
    if not full.startswith(head):
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the prompt with its "
                        "reference response, so the response's tokens cannot be located. Fix: a prefix-stable "
                        "template (data.template)")
    ids = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[:ids.index(eos) + 1]
    finish = "length" if len(ids) > max_new_tokens or eos not in ids else "stop"
    ids = ids[:max_new_tokens]
    return Sample(row["prompt_ids"], ids, [0.0] * len(ids), finish, response, off_policy=True)


def check_responses(cfg: RunConfig, tokenizer, ds, rows: list[dict], where: str) -> None:
    """Before any worker starts: the first prompt rows' reference responses render and tokenise, and
    every record of a map-style dataset has one (a stream is checked as it is read)."""
    import json

    for i, row in enumerate(rows):
        reference_response(tokenizer, cfg.data.template, row, cfg.data.keys.response, cfg.rollout.max_new_tokens,
                           f"{where}, prompt {i}")
    if cfg.data.streaming:
        return
    key = cfg.data.keys.response
    for i, meta in enumerate(ds["meta"]):
        if not json.loads(meta).get(key):
            raise DataError(f"{where}, prompt {i}: algorithm.distill.on_policy={cfg.algorithm.distill.on_policy} trains "
                            f"the off-policy groups on each prompt's reference response, but it has no '{key}'. "
                            "Fix: add it to every record (data.keys.response names the key), or on_policy=1")


def mixed_episodes(cfg: RunConfig, tokenizer, rollout, prompts: list[dict], seed: int, step: int,
                   run_episodes) -> tuple[list[Sample], dict]:
    """The step's samples in prompt-major order, as `run_episodes` gives them: the student's for the
    on-policy groups (one engine call for all of them), the reference response n times for the rest."""
    n = cfg.rollout.n_samples_per_prompt
    off = off_policy_groups(cfg, step, len(prompts))
    on_rows = [p for p, o in zip(prompts, off) if not o]
    sampled, metrics = run_episodes(cfg, tokenizer, rollout, on_rows, seed) if on_rows else ([], {})
    out, i = [], 0
    for row, o in zip(prompts, off):
        if o:
            s = reference_response(tokenizer, cfg.data.template, row, cfg.data.keys.response, cfg.rollout.max_new_tokens)
            out += [dataclasses.replace(s) for _ in range(n)]
        else:
            out += sampled[i * n:(i + 1) * n]
            i += 1
    return out, metrics | {"gkd/off_policy": sum(off) / len(off)}
