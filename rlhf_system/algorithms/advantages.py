"""Advantage estimators for policy-gradient RLHF: GAE, GRPO, RLOO, REINFORCE++, and on-policy
distillation (OPD), in pure torch.

What this is: functions from rewards/scores (and, for GAE, critic values) to per-token
advantages, plus `compute_advantages`, the one dispatcher the PPO controller calls.

What this is not: no model forward, no loss, no cross-rank reduction. Whitening is over the
tensors passed in (one rank's batch); group estimators need every sample of a prompt in the same
call.

Conventions: B batch, T response positions (right-padded). `mask` (B, T) is 1/True on real
response tokens, contiguous from position 0 in each row (checked, see `kl.response_lengths`).
Sequence-level scores are (B,) (or (N,)). Groups: the G samples of one prompt are contiguous, rows
[i*G:(i+1)*G]. Everything here is a constant for the losses: inputs are detached and outputs carry
no gradient. Outputs are 0 at masked positions and at least float32.

No Python loop runs over time: discounted sums over the future are one matmul with a (T, T)
discount matrix (`discounted_cumsum`), which is exact and numerically tame. The alternative,
reversed cumsum of x_t * c^-t rescaled by c^t, overflows as soon as c^-T does (0.95^-2000 ~ 1e44).
"""

from __future__ import annotations

import torch

from rlhf_system.algorithms.kl import response_lengths, shape_rewards
from rlhf_system.algorithms.logprobs import masked_mean
from rlhf_system.algorithms.names import ADVANTAGE_ESTIMATORS


def _float(x: torch.Tensor) -> torch.Tensor:
    """Detached, at least float32 (bf16 rewards would lose the small differences GAE sums)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def _kept(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is 1, else 0, selected (not multiplied), so NaN/inf under the mask vanish."""
    if mask.shape != x.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of x {tuple(x.shape)}")
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / G, G) view of contiguous groups; ValueError unless G >= 2 divides N."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be (N,), got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group estimators need group_size >= 2 (the baseline is the other samples), got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    return _float(scores).view(-1, group_size)


# ----------------------------------------------------------------------------------- building blocks


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening over every kept element of the batch: (B, T), (B, T) -> (B, T).

    (x - mean) / sqrt(var + eps) with mean and variance over kept elements only (a global,
    token-weighted statistic, not per row); shift_mean=False adds the mean back, i.e. only rescales
    (as TRL's `masked_whiten`, used for rewards whose sign should survive). The variance is the
    population one (divide by n, not n - 1): it is defined for a single kept element and the
    difference is negligible at batch sizes of thousands of tokens. Masked positions give 0.
    """
    x = _kept(_float(x), mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _kept(out, mask)


def discount_matrix(T: int, rate: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """(T, T) upper-triangular matrix D[t, s] = rate^(s - t) for s >= t, else 0.

    rate^0 = 1 also for rate = 0 (torch.pow(0, 0) = 1), so rate 0 gives the identity. Powers that
    underflow become 0, which is their correct limit. T*T floats: 64 MB at T = 4096 in float32.
    """
    idx = torch.arange(T, device=device)
    lag = idx[None, :] - idx[:, None]
    powers = torch.tensor(rate, dtype=dtype, device=device).pow(lag.clamp(min=0).to(dtype))
    return torch.where(lag >= 0, powers, torch.zeros((), dtype=dtype, device=device))


def discounted_cumsum(x: torch.Tensor, rate: float) -> torch.Tensor:
    """y_t = sum_{s >= t} rate^(s - t) x_s along the last dim: (B, T) -> (B, T), one matmul.

    Equivalent to the backward recursion y_t = x_t + rate * y_{t+1}, y_T = 0.
    """
    D = discount_matrix(x.shape[-1], rate, device=x.device, dtype=x.dtype)
    return x @ D.T


def expand_to_tokens(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per sequence to each of its kept tokens: (B,), (B, T) -> (B, T), 0 elsewhere."""
    if seq_adv.shape != mask.shape[:1]:
        raise ValueError(f"seq_adv must be (B,) = {tuple(mask.shape[:1])}, got {tuple(seq_adv.shape)}")
    return _kept(_float(seq_adv)[:, None].expand(mask.shape), mask)


# ------------------------------------------------------------------------------------- with a critic


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, Schulman et al. 2016, eq. 16: (B, T) x 3 -> (adv, returns).

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t, with the value after the last kept token taken
    as 0 (the response is over: the episode ends there, it is not truncated), and
    A_t = sum_l (gamma * lam)^l delta_{t+l}. lam = 1 gives the Monte-Carlo return minus V_t;
    lam = 0 the one-step TD error. returns = A + V are the critic's regression targets
    (the TD(lam) return). Both are 0 at masked positions, where values/rewards may hold anything.
    """
    _check_rate("gamma", gamma)
    _check_rate("lam", lam)
    response_lengths(mask)
    r = _kept(_float(token_rewards), mask)
    v = _kept(_float(values), mask)
    # V_{t+1} * m_{t+1}: masked values are already 0, and past the end of the row there is none
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=-1)
    delta = _kept(r + gamma * next_v - v, mask)
    advantages = _kept(discounted_cumsum(delta, gamma * lam), mask)
    return advantages, _kept(advantages + v, mask)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = sum_{s >= t} gamma^(s - t) r_s over kept tokens: (B, T), (B, T) -> (B, T)."""
    _check_rate("gamma", gamma)
    response_lengths(mask)
    return _kept(discounted_cumsum(_kept(_float(token_rewards), mask), gamma), mask)


# ---------------------------------------------------------------------------------- critic-free


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO outcome-supervision advantages, (N,) -> (N,): (s - group mean) / (group std + eps).

    Shao et al. 2024 (DeepSeekMath), sec. 4.1.2: each sample's advantage is its score normalised
    within the G samples of its prompt. The std is the population one (divide by G): the paper
    does not say, TRL uses the sample std (divide by G - 1); the two differ by sqrt(G / (G - 1)), a
    constant scale per group size. A group of equal scores gets 0 (eps keeps it finite).
    scale=False only centres, Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"),
    which drops the division because it up-weights prompts that are too easy or too hard.
    """
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages, (N,) -> (N,): s_i - mean of the other G - 1 scores.

    Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free!"), used for RLHF by
    Ahmadian et al. 2024 ("Back to Basics"), eq. 6. The baseline excludes s_i, so it is independent
    of sample i and the estimator stays unbiased. Computed as G / (G - 1) * (s_i - group mean),
    which is the same quantity: s_i - (sum - s_i) / (G - 1).
    """
    groups = _groups(scores, group_size)
    return (group_size / (group_size - 1) * (groups - groups.mean(-1, keepdim=True))).reshape(-1)


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++"): (B, T), (B, T) -> (B, T).

    Discounted reward-to-go per token, then whitened over every kept token of the batch. The
    global (batch) normalisation is the method's substitute for a critic or a per-prompt baseline.
    """
    return whiten(discounted_returns(token_rewards, mask, gamma), mask)


def reinforce_pp_baseline_advantages(
    scores: torch.Tensor,
    kl_token_penalty: torch.Tensor | None,
    mask: torch.Tensor,
    group_size: int,
    gamma: float = 1.0,
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025): (B,), (B, T) | None, (B, T) -> (B, T).

    Each score minus its group's mean score, placed at the last kept token; minus the per-token KL
    penalty `kl_token_penalty` (already multiplied by its coefficient; None: no penalty) on every
    kept token; reward-to-go; then global whitening over kept tokens. The group mean removes the
    prompt's difficulty; the whitening sets the scale (instead of GRPO's per-group std).
    """
    centred = _groups(scores, group_size)
    centred = (centred - centred.mean(-1, keepdim=True)).reshape(-1)
    token_rewards = shape_rewards(centred, kl_token_penalty, mask, 1.0)
    return reinforce_pp_advantages(token_rewards, mask, gamma)


# ------------------------------------------------------------------------------ on-policy distillation


def opd_advantages(reverse_kl: torch.Tensor, mask: torch.Tensor, coef: float = 1.0,
                   discount: float = 0.0) -> torch.Tensor:
    """On-policy distillation: the student samples, a frozen teacher scores the same tokens, and each
    token's reward is minus the sampled reverse KL, r_t = -coef * (log pi_student(a_t) - log pi_teacher(a_t))
    (GKD, Agarwal et al. 2024, with only student samples and the reverse KL; Lu & Thinking Machines 2025).
    Its expectation under the student is -coef * KL(student || teacher) at that position.

    A_t = sum_{s >= t} discount^(s - t) r_s. discount 0 (the default) gives each token its own reward
    only: lower variance, and what the published recipes use. discount 1 makes the update the unbiased
    gradient of the sequence-level reverse KL. No baseline and no whitening: the reward is dense and
    already centred where the student matches the teacher (0), so its scale is the signal.

    reverse_kl (B, T): log pi_student - log pi_teacher at the sampled tokens (kl.kl_penalty "k1")."""
    _check_rate("discount", discount)
    response_lengths(mask)
    r = _kept(-coef * _float(reverse_kl), mask)
    return r if discount == 0 else _kept(discounted_cumsum(r, discount), mask)


# ------------------------------------------------------------------------------------- dispatcher


def compute_advantages(
    estimator: str,
    *,
    scores: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_in_reward: bool = True,
    gamma: float = 1.0,
    lam: float = 0.95,
    group_size: int = 1,
    whiten_advantages: bool = True,
    distill_coef: float = 1.0,
    distill_discount: float = 0.0,
    distill_reward_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages (B, T) and critic targets (B, T), or None for critic-free estimators.

    scores (B,) sequence rewards; mask (B, T); values (B, T) critic values (gae only); kl (B, T)
    per-token KL estimate (e.g. `kl.kl_penalty`), used only when kl_in_reward and kl_coef > 0.
    - "gae": rewards = `shape_rewards(scores, kl, mask, kl_coef)`, then `gae`; advantages whitened
      if `whiten_advantages`; returns from GAE (never whitened: they are value targets).
    - "grpo": `grpo_advantages` per token. The KL is NOT put in the reward: GRPO regularises with a
      KL loss term instead (DeepSeekMath eq. 3, see `losses.kl_loss`), so `kl` is ignored here.
      No whitening: the advantages are already normalised per group.
    - "dr_grpo": as "grpo" but only centred (`grpo_advantages(scale=False)`), Dr. GRPO; its other half,
      no length normalisation, is the loss's `seq_sum_norm` aggregation.
    - "rloo": the KL is part of the sequence reward, as in Ahmadian et al. 2024 (R = r - beta *
      sum_t KL_t), then `rloo_advantages` per token, whitened if `whiten_advantages`.
    - "reinforce_pp": shaped rewards as for gae, then `reinforce_pp_advantages` (whitened by
      definition; `whiten_advantages` is not consulted).
    - "reinforce_pp_baseline": `reinforce_pp_baseline_advantages` with penalty kl_coef * kl.
    - "opd": on-policy distillation, `opd_advantages(kl, mask, distill_coef, distill_discount)` with `kl`
      the per-token k1 log-ratio of the student to the teacher (always used: kl_coef and kl_in_reward
      are not consulted); plus distill_reward_coef times the GRPO advantage of the scores when it is not
      0 (distillation and the task reward together). Not whitened.
    gamma/lam apply to the per-token estimators only.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if estimator == "opd":
        if kl is None:
            raise ValueError("the opd estimator needs the student's and the teacher's log-probs (kl)")
        advantages = opd_advantages(kl, mask, distill_coef, distill_discount)
        if distill_reward_coef:
            advantages = advantages + distill_reward_coef * expand_to_tokens(grpo_advantages(scores, group_size), mask)
        return advantages, None
    use_kl = kl_in_reward and kl is not None and kl_coef != 0
    kl_used = kl if use_kl else None
    if estimator == "gae":
        if values is None:
            raise ValueError("the gae estimator needs critic values")
        advantages, returns = gae(shape_rewards(scores, kl_used, mask, kl_coef), values, mask, gamma, lam)
        return (whiten(advantages, mask) if whiten_advantages else advantages), returns
    if estimator in ("grpo", "dr_grpo"):
        return expand_to_tokens(grpo_advantages(scores, group_size, scale=estimator == "grpo"), mask), None
    if estimator == "rloo":
        seq_rewards = _float(scores)
        if kl_used is not None:
            seq_rewards = seq_rewards - kl_coef * _kept(_float(kl_used), mask).sum(-1)
        advantages = expand_to_tokens(rloo_advantages(seq_rewards, group_size), mask)
        return (whiten(advantages, mask) if whiten_advantages else advantages), None
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(shape_rewards(scores, kl_used, mask, kl_coef), mask, gamma), None
    penalty = None if kl_used is None else kl_coef * _float(kl_used)
    return reinforce_pp_baseline_advantages(scores, penalty, mask, group_size, gamma), None
