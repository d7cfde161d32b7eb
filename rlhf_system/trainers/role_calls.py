"""How the PPO controller calls its role groups: rows dealt to ranks by tokens, roles in turn or together,
and sampled episodes as the typed batch (Experience) that crosses to the workers."""

from __future__ import annotations

import torch

from rlhf_system.algorithms.balance import rank_order
from rlhf_system.config import RunConfig
from rlhf_system.data.experience import Experience
from rlhf_system.data.samples import Sample

ROLE_OF = {"old": "actor", "ref": "reference", "values": "critic", "actor": "actor", "critic": "critic"}


def in_turn_or_together(cfg: RunConfig, calls: dict) -> dict:
    """Run several roles' calls (`start() -> wait`, keyed as ROLE_OF); results by key. Roles on devices of
    their own work at the same time. Roles that share devices take turns: a colocate group on GPUs
    (side by side they would hold both roles' activations on one GPU at once), and on a CPU-only
    placement every role, since each computes with all of the node's cores (distributed/threads.py)."""
    if cfg.placement.gpus_per_node == 0 or not calls:
        return {k: start()() for k, start in calls.items()}
    lane_of = {role: i for i, group in enumerate(cfg.placement.colocate) for role in group}
    lanes: dict = {}
    for k in calls:
        lanes.setdefault(lane_of.get(ROLE_OF[k], ROLE_OF[k]), []).append(k)
    out = {}
    for turn in range(max(len(keys) for keys in lanes.values())):
        waits = {keys[turn]: calls[keys[turn]]() for keys in lanes.values() if turn < len(keys)}
        out |= {k: w() for k, w in waits.items()}
    return out


def sharded(cfg: RunConfig, group, method: str, exp: Experience, *args, by_rank: bool = False):
    """`group.submit_sharded` with the rows dealt so that every rank gets near-equal tokens
    (train.balance_ranks; algorithms/balance.py), not contiguous shares whose lengths happen to differ;
    per-row results come back in `exp`'s row order."""
    if not cfg.train.balance_ranks or group.world_size == 1:
        return group.submit_sharded(method, exp, *args, by_rank=by_rank)
    perm = torch.tensor(rank_order((exp.prompt_lens + exp.response_lens).tolist(), group.world_size))
    wait = group.submit_sharded(method, exp.select(perm), *args, by_rank=by_rank)
    if by_rank:
        return wait

    def unsort(got: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(got)
        out[perm] = got
        return out

    def in_row_order():
        got = wait()
        return tuple(unsort(g) for g in got) if isinstance(got, tuple) else unsort(got)

    return in_row_order


def experience_of(prompt_ids: list[list[int]], samples: list[Sample], pad_id: int) -> Experience:
    """Sampled episodes (trainers/episodes.py) as an Experience; the environment's tokens of a multi-turn
    episode are in the sequence but out of the action mask (not trained, not scored). An episode's own
    prompt ids (an environment's first observation, an agent's first call) come before its row's."""
    prompt_ids = [g.prompt_ids or p for p, g in zip(prompt_ids, samples)]
    exp = Experience.from_rollout(prompt_ids, [g.response_ids for g in samples], pad_id,
                                  [g.logprobs for g in samples])
    if any(g.action_mask is not None for g in samples):
        exp.action_mask = exp.pad_responses([g.action_mask or [1] * len(g.response_ids) for g in samples])
    return exp
