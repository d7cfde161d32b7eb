"""Training losses for SFT, reward modelling, DPO and PPO (policy, value, KL), in pure torch.

What this is: functions from tensors to a scalar loss (plus, where useful, a dict of detached
float32 0-d tensor metrics; call `.item()` when logging, which syncs a GPU, so do it once per
step, not per micro-batch).

What this is not: no model forward, no optimiser, no cross-rank or cross-micro-batch reduction.
Every mean here is over the tensors passed in; trainers that accumulate gradients or run on
several ranks and want an exact global token mean use the `*_sum` variants (see `sft_loss_sum`).

Conventions: B batch, T positions, V vocabulary. Masks are 0/1 tensors of the shape of what they
mask. "Token-level mean" means: sum over every kept token of the batch, divided by the number of
kept tokens (long responses weigh more than short ones), as opposed to a per-sequence mean first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_system.algorithms.kl import kl_penalty
from rlhf_system.algorithms.logprobs import masked_mean, masked_sum, shifted_logprobs

Metrics = dict[str, torch.Tensor]


def _metric(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float()


# --------------------------------------------------------------------------------------------- SFT


def sft_loss_sum(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over trained tokens, and their count: (sum (), n_tokens () long).

    logits (B, T, V) from a causal LM over input_ids (B, T); loss_mask (B, T) marks which TOKENS
    are trained: loss_mask[:, t] = 1 trains log p(input_ids[:, t] | input_ids[:, :t]), which uses
    logits[:, t-1]. Both labels and mask are therefore shifted by one, and loss_mask[:, 0] is
    ignored: nothing predicts the first token. (In a packed row, the first token of each later
    sample is "predicted" by the previous sample's last position; it is a prompt token, so its
    mask is 0 and no cross-sample loss is trained.)

    Why a sum: with gradient accumulation (or data parallelism), averaging per micro-batch and
    then averaging the micro-batch means weighs a token in a micro-batch of 10 trained tokens 100
    times more than one in a micro-batch of 1000. Summing here, and dividing by the token count of
    the whole optimiser step (summed over micro-batches and all-reduced over ranks), gives exactly
    the token-level mean of the global batch, independent of how it was split.
    """
    mask = loss_mask[:, 1:]
    nll = -shifted_logprobs(logits, input_ids)
    return masked_sum(nll, mask), mask.bool().sum()


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Next-token cross-entropy, token-level mean over the batch: (loss (), {"tokens": n}).

    Shapes and the mask shift as in `sft_loss_sum`. An all-zero mask gives loss 0 with zero
    gradient, not NaN (see `logprobs.masked_mean`). This is the local mean over the tensors passed
    in; see `sft_loss_sum` for the exact global mean under gradient accumulation.
    """
    total, n = sft_loss_sum(logits, input_ids, loss_mask)
    return total / n.clamp(min=1), {"tokens": _metric(n)}


# ------------------------------------------------------------------------------------ reward model


def pairwise_rm_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry reward-model loss: mean of -log sigmoid(r_c - r_r - margin), over (B,) pairs.

    Ouyang et al. 2022 (InstructGPT), eq. 1; the optional margin (a float, or (B,) per pair, e.g.
    from annotator preference strength) follows Llama 2 (Touvron et al. 2023), sec. 3.2.2: the
    chosen reward must beat the rejected one by at least `margin` before the loss flattens.
    `F.logsigmoid` is used because log(sigmoid(d)) underflows to log(0) = -inf for d << 0.

    Metrics: accuracy = fraction of pairs with r_c > r_r (ties count as wrong); margin_mean =
    mean of r_c - r_r (the observed reward gap, not the `margin` argument).
    """
    diff = chosen_rewards.float() - rejected_rewards.float()
    target = diff if margin is None else diff - margin
    loss = -F.logsigmoid(target).mean()
    return loss, {"accuracy": _metric((diff > 0).float().mean()), "margin_mean": _metric(diff.mean())}


# ------------------------------------------------------------------------------------------- DPO

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Direct preference optimisation loss over (B,) per-sequence summed log-probs.

    With h = (pi_c - pi_r) - (ref_c - ref_r):
    - "sigmoid": DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h). With label_smoothing
      eps > 0, conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"), which
      assumes each label is flipped with probability eps:
      -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h).
    - "ipo": IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, which regresses h to a finite
      target instead of pushing it to infinity when preferences are deterministic. The paper's h
      is on summed log-probs as here; TRL divides by response length for IPO, so to match TRL,
      pass length-normalised log-probs.

    Reference log-probs are detached: the reference model is a constant. Metrics (detached means):
    rewards_chosen = beta * (pi_c - ref_c), rewards_rejected = beta * (pi_r - ref_r), the implicit
    rewards of DPO sec. 5; reward_accuracy = fraction with rewards_chosen > rewards_rejected;
    reward_margin = rewards_chosen - rewards_rejected.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("dpo label_smoothing applies to loss_type='sigmoid' only, not 'ipo'")
    chosen = policy_chosen_logps.float() - ref_chosen_logps.detach().float()
    rejected = policy_rejected_logps.float() - ref_rejected_logps.detach().float()
    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        eps = label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    r_c, r_r = beta * chosen.detach(), beta * rejected.detach()
    return losses.mean(), {
        "rewards_chosen": _metric(r_c.mean()),
        "rewards_rejected": _metric(r_r.mean()),
        "reward_accuracy": _metric((r_c > r_r).float().mean()),
        "reward_margin": _metric((r_c - r_r).mean()),
    }


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence log-prob: sum of token log-probs where mask is 1, (B, T') -> (B,).

    This is the log p(y | x) of a response that DPO compares. With token_logps from
    `shifted_logprobs(logits, input_ids)` (B, T-1), pass `mask = loss_mask[:, 1:]`.
    """
    return masked_sum(token_logps, mask, dim=-1)


def dpo_nll(policy_chosen_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL of the chosen responses, token-level mean over the batch: (B, T'), (B, T') -> ().

    The extra term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    eq. 2): loss = dpo_loss + alpha * dpo_nll. DPO alone can lower the log-prob of the chosen
    response as long as the rejected one falls faster; the NLL term keeps chosen likely. The paper
    normalises each sequence by its length then averages; this is the token-level mean (as in
    `sft_loss`), the same when lengths are equal. Mask alignment as `sequence_logps`.
    """
    return masked_mean(-policy_chosen_token_logps, mask)


# ------------------------------------------------------------------------------------------- PPO

LOSS_AGGS = ("token", "seq", "seq_sum_norm")


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, agg: str = "token", norm_len: int = 0) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over kept tokens.

    - "token": masked mean over every kept token of the batch (long responses weigh more; the
      DAPO choice, Yu et al. 2025, sec. 3.3).
    - "seq": per-row masked mean, then the mean over rows (each response weighs the same, as in
      the original GRPO objective, Shao et al. 2024, eq. 3).
    - "seq_sum_norm": per-row masked SUM divided by the constant `norm_len` (the generation budget),
      then the mean over rows: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec.
      3.1), which finds that dividing by each response's own length makes long wrong answers cheap.
    Rows with no kept token are left out of the row mean rather than counted as a 0 loss. "token" and
    "seq" agree when every row keeps the same number of tokens.
    """
    if agg not in LOSS_AGGS:
        raise ValueError(f"loss agg must be one of {LOSS_AGGS}, got {agg!r}")
    if agg == "token":
        return masked_mean(per_token, mask)
    if agg == "seq":
        rows = masked_mean(per_token, mask, dim=-1)
    else:
        if norm_len <= 0:
            raise ValueError(f"loss agg 'seq_sum_norm' needs norm_len > 0 (the generation budget), got {norm_len}")
        rows = masked_sum(per_token, mask, dim=-1) / norm_len
    return masked_mean(rows, mask.bool().any(-1))


def truncated_is_weights(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_rollout, cap), detached: (B, T), (B, T) -> (B, T).

    Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training": the
    inference engine (vLLM) samples from pi_rollout, which differs numerically from the trainer's
    pi_old (other kernels, precision); weighting the PPO loss by this ratio corrects for the
    mismatch, and truncating at `cap` bounds the variance (TIS). `old_logprobs` are the trainer's
    log-probs of the sampled tokens before the update, `rollout_logprobs` the engine's. With `mask`,
    masked positions give 0 (they may hold anything, NaN included).
    """
    if cap <= 0:
        raise ValueError(f"truncated importance sampling cap must be > 0, got {cap}")
    dtype = torch.promote_types(torch.promote_types(old_logprobs.dtype, rollout_logprobs.dtype), torch.float32)
    log_ratio = old_logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype)
    if mask is not None:
        minus_inf = torch.full((), float("-inf"), dtype=dtype, device=log_ratio.device)
        log_ratio = torch.where(mask.bool(), log_ratio, minus_inf)
    # exp(+inf) = inf is clamped to cap; exp(-inf) = 0 is the masked value
    return torch.exp(log_ratio).clamp(max=cap)


def masked_is_weights(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, low: float, high: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked importance sampling, detached: 1 where low <= pi_old / pi_rollout <= high, else 0, (B, T).

    The masked variant of `truncated_is_weights` (Yao et al. 2025; "MIS" in verl's rollout correction):
    instead of down-weighting a token whose sampler and trainer disagree too much, it is left out of
    the loss. Off-policy training (train.max_staleness > 0) samples with a policy some updates old,
    and a token that policy found likely but the current one does not carries a gradient that points
    nowhere useful. Masked positions give 0.
    """
    if not 0 <= low < 1 < high:
        raise ValueError(f"masked IS band must satisfy 0 <= low < 1 < high, got [{low}, {high}]")
    ratio = torch.exp(old_logprobs.detach().float() - rollout_logprobs.detach().float())
    keep = (ratio >= low) & (ratio <= high)
    if mask is not None:
        keep = keep & mask.bool()
    return keep.float()


def policy_loss_ppo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token",
    is_weights: torch.Tensor | None = None,
    norm_len: int = 0,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate, masked mean: all inputs (B, T) -> (loss (), metrics).

    Schulman et al. 2017, eq. 7, as a loss: max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) with
    r = exp(logprobs - old_logprobs). The max (pessimistic bound) removes the incentive to move r
    outside the clip range in the direction the advantage rewards. `clip_eps_high` (default
    clip_eps) widens only the upper bound, "clip-higher" of DAPO (Yu et al. 2025, sec. 3.1), so
    low-probability tokens with positive advantage can still grow and entropy does not collapse.

    `dual_clip` c > 1 (None or 0: off), Ye et al. 2020 ("Mastering Complex Control in MOBA Games
    with Deep RL", eq. 5): for A < 0 the loss is min(max(...), -c A). Without it, a token whose
    ratio is already far above 1 + eps with A < 0 has an unbounded loss -A r (and gradient); the
    dual clip caps it at c |A| with zero gradient, so stale off-policy tokens cannot dominate.

    `is_weights` (B, T), e.g. `truncated_is_weights`, multiplies the per-token loss (detached; 0
    is used at masked positions, so anything there is safe). `agg` as `aggregate_loss`.

    old_logprobs and advantages are treated as constants (detached). Values of logprobs and
    old_logprobs at masked positions must be finite: the forward ignores them, but an inf ratio
    there gives 0 * inf = NaN gradient.

    Metrics (token-level masked means, whatever `agg`): clipfrac = fraction of tokens where the
    clipped term is the one taken (their gradient is zero); approx_kl = mean of (r - 1) - log r,
    the non-negative, unbiased "k3" estimator of KL(old || new) (Schulman 2020, "Approximating KL
    divergence"); ratio_mean; with dual clip, dual_clipfrac = fraction of tokens capped at -c A.
    """
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if eps_low <= 0 or eps_high <= 0:
        raise ValueError(f"clip_eps and clip_eps_high must be > 0, got {eps_low}, {eps_high}")
    if dual_clip and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or None/0: off), got {dual_clip}")
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    metrics: Metrics = {}
    if dual_clip:
        cap = -dual_clip * advantages
        capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
        metrics["dual_clipfrac"] = _metric(masked_mean(capped.float(), mask))
    if is_weights is not None:
        per_token = per_token * torch.where(mask.bool(), is_weights.detach(), torch.zeros_like(is_weights))
    loss = aggregate_loss(per_token, mask, agg, norm_len)
    with torch.no_grad():
        metrics.update({
            "clipfrac": _metric(masked_mean((clipped > unclipped).float(), mask)),
            "approx_kl": _metric(masked_mean(ratio - 1.0 - log_ratio, mask)),
            "ratio_mean": _metric(masked_mean(ratio, mask)),
        })
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    agg: str = "token",
    norm_len: int = 0,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss, masked mean: all inputs (B, T) -> (loss (), {"vf_clipfrac"}).

    0.5 * max((v - R)^2, (v_clip - R)^2) with v_clip = old_v + clip(v - old_v, -clip, clip): the
    value head may not move more than `clip` from its rollout-time estimate per update, as in the
    PPO reference implementation (OpenAI baselines ppo2; Schulman et al. 2017). Engstrom et al.
    2020 ("Implementation Matters in Deep Policy Gradients") find this clipping does not reliably
    help, so clip=0 disables it: 0.5 * (v - R)^2. Note the clip is in reward units, so it should
    scale with the reward scale. old_values and returns are treated as constants (detached).
    `agg` as `aggregate_loss`.

    vf_clipfrac = fraction of kept tokens where the clipped term is strictly larger (and so taken,
    with zero gradient); 0 when clipping is off.
    """
    if clip < 0:
        raise ValueError(f"value clip must be >= 0 (0 disables it), got {clip}")
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns) ** 2
    if clip == 0:
        return 0.5 * aggregate_loss(unclipped, mask, agg, norm_len), {"vf_clipfrac": _metric(values.new_zeros(()))}
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped, clipped), mask, agg, norm_len)
    return loss, {"vf_clipfrac": _metric(masked_mean((clipped > unclipped).float(), mask))}


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    agg: str = "token",
    norm_len: int = 0,
) -> tuple[torch.Tensor, Metrics]:
    """KL(pi || pi_ref) as a loss term: (B, T) x 3 -> (loss (), {"kl_mean"}).

    The GRPO way of regularising (Shao et al. 2024, DeepSeekMath, eq. 4, with the "k3" estimator)
    instead of putting the KL into the reward: loss = agg of `kl.kl_penalty(logprobs, ref, est)`,
    added to the policy loss with its coefficient by the caller. Gradients flow through `logprobs`
    only; the reference is detached. Masked positions may hold anything (see `kl_penalty`).
    kl_mean is the token-level masked mean of the estimate, whatever `agg`.
    """
    kl = kl_penalty(logprobs, ref_logprobs.detach(), estimator, mask=mask)
    return aggregate_loss(kl, mask, agg, norm_len), {"kl_mean": _metric(masked_mean(kl, mask))}
