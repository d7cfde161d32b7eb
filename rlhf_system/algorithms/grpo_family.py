"""The GRPO-family variants, in pure torch: GSPO and CISPO policy losses, DAPO's dynamic sampling and
overlong reward shaping. Each is a config choice (config.AlgorithmConfig / RolloutConfig / RewardsConfig);
the PPO controller and the actor pick them up, nothing here knows about workers.

Conventions as losses.py: (B, T) per-token tensors, 0/1 masks, losses return (scalar, metrics of
detached float32 0-d tensors). Dr. GRPO is `advantages.grpo_advantages(scale=False)` with the
`seq_sum_norm` aggregation of `losses.aggregate_loss`; it needs nothing here.
"""

from __future__ import annotations

import torch

from rlhf_system.algorithms.logprobs import masked_mean
from rlhf_system.algorithms.losses import Metrics, aggregate_loss


def _metric(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float()


def _bounds(clip_eps: float, clip_eps_high: float | None) -> tuple[float, float]:
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if clip_eps <= 0 or high <= 0:
        raise ValueError(f"clip_eps and clip_eps_high must be > 0, got {clip_eps}, {high}")
    return 1.0 - clip_eps, 1.0 + high


def policy_loss_gspo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    agg: str = "seq",
    is_weights: torch.Tensor | None = None,
    norm_len: int = 0,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO, Zheng et al. 2025 ("Group Sequence Policy Optimization"), in its GSPO-token form (eq. 13-14).

    One importance ratio per sequence, the geometric mean of its token ratios:
    s_i = exp(mean_t (logp_t - old_t)) over the row's kept tokens. Per token the ratio is
    s_it = sg(s_i) * pi_t / sg(pi_t): equal to s_i in value, with the gradient of log pi_t. Loss per
    token max(-A_t s_it, -A_t clip(s_it, 1 - eps, 1 + eps_high)), aggregated by `agg` ("seq", the
    paper's, by default). With a sequence-level advantage (GRPO's, broadcast over the row) this is
    exactly GSPO's sequence objective: the whole sequence is clipped or not, together. The paper's
    bounds are far tighter than PPO's (3e-4 and 4e-4), as a mean log-ratio moves far less than a
    token's. `is_weights` multiplies the per-token loss, as in `losses.policy_loss_ppo`.

    Metrics: clipfrac (fraction of kept sequences clipped), ratio_mean (mean s_i over kept rows).
    """
    low, high = _bounds(clip_eps, clip_eps_high)
    advantages = advantages.detach()
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    seq_log_ratio = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)                    # (B,)
    s = torch.exp(seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach())   # (B, T): s_i in value
    unclipped = -advantages * s
    clipped = -advantages * s.clamp(low, high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * torch.where(mask.bool(), is_weights.detach(), torch.zeros_like(is_weights))
    loss = aggregate_loss(per_token, mask, agg, norm_len)
    rows = mask.bool().any(-1)
    with torch.no_grad():
        seq_ratio = torch.exp(seq_log_ratio)
        clipped_rows = ((seq_ratio < low) | (seq_ratio > high)).float()
        metrics = {"clipfrac": _metric(masked_mean(clipped_rows, rows.float())),
                   "ratio_mean": _metric(masked_mean(seq_ratio, rows.float()))}
    return loss, metrics


def policy_loss_cispo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 1.0,
    clip_eps_high: float | None = 0.28,
    agg: str = "token",
    is_weights: torch.Tensor | None = None,
    norm_len: int = 0,
) -> tuple[torch.Tensor, Metrics]:
    """CISPO, MiniMax 2025 ("MiniMax-M1", sec. 3.1, eq. 4-5): REINFORCE with a clipped importance weight.

    loss_t = -sg(clip(r_t, 1 - eps, 1 + eps_high)) * A_t * logp_t, r_t = exp(logp_t - old_t). PPO's clip
    zeroes the gradient of a token whose ratio left the range (rare tokens that matter for reasoning,
    the paper argues); here the weight is bounded but every token's log-prob gradient still flows.
    The paper sets no lower bound: clip_eps = 1 gives 1 - eps = 0, which r never goes below.
    `is_weights` multiplies the per-token loss, as in `losses.policy_loss_ppo`.

    Metrics: clipfrac (fraction of kept tokens whose weight was clipped), ratio_mean.
    """
    low, high = _bounds(clip_eps, clip_eps_high)
    ratio = torch.exp(logprobs.detach() - old_logprobs.detach())
    weight = ratio.clamp(low, high)
    per_token = -weight * advantages.detach() * logprobs
    if is_weights is not None:
        per_token = per_token * torch.where(mask.bool(), is_weights.detach(), torch.zeros_like(is_weights))
    loss = aggregate_loss(per_token, mask, agg, norm_len)
    with torch.no_grad():
        metrics = {"clipfrac": _metric(masked_mean(((ratio < low) | (ratio > high)).float(), mask)),
                   "ratio_mean": _metric(masked_mean(ratio, mask))}
    return loss, metrics


# ------------------------------------------------------------------------------------- DAPO


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025, sec. 3.2, eq. 11): (N,) scores -> (N / G,) bool, True for
    the groups whose scores are not all equal. A group where every sample scored the same has zero
    advantage under GRPO, so it adds nothing but batch size; DAPO drops it and samples more prompts."""
    if scores.dim() != 1 or group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"{tuple(scores.shape)} scores do not split into groups of {group_size}")
    g = scores.detach().float().view(-1, group_size)
    return (g.max(-1).values - g.min(-1).values) > 0


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, sec. 3.4, eq. 13): (B,) response lengths -> (B,)
    rewards to add. 0 up to max_len - buffer tokens, then falling linearly to -penalty at max_len
    (and -penalty beyond). A response cut at the length limit is not simply wrong; the ramp tells
    the policy that length is what cost it, before the hard limit."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    start = max_len - buffer
    return -penalty * ((lengths - start) / buffer).clamp(min=0.0, max=1.0)
