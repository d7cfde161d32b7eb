"""Training losses for SFT, reward modelling, DPO and PPO, in pure torch.

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


def policy_loss_ppo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate, token-level masked mean: all inputs (B, T) -> (loss (), metrics).

    Schulman et al. 2017, eq. 7, as a loss: max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) with
    r = exp(logprobs - old_logprobs). The max (pessimistic bound) removes the incentive to move r
    outside the clip range in the direction the advantage rewards. `clip_eps_high` (default
    clip_eps) widens only the upper bound, "clip-higher" of DAPO (Yu et al. 2025, sec. 3.1), so
    low-probability tokens with positive advantage can still grow and entropy does not collapse.

    old_logprobs and advantages are treated as constants (detached). Values at masked positions
    must be finite: the forward ignores them, but an inf ratio there gives 0 * inf = NaN gradient.

    Metrics (masked means): clipfrac = fraction of tokens where the clipped term is the one taken
    (their gradient is zero); approx_kl = mean of (r - 1) - log r, the non-negative, unbiased "k3"
    estimator of KL(old || new) (Schulman 2020, "Approximating KL divergence"); ratio_mean.
    """
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if eps_low <= 0 or eps_high <= 0:
        raise ValueError(f"clip_eps and clip_eps_high must be > 0, got {eps_low}, {eps_high}")
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": _metric(masked_mean((clipped > unclipped).float(), mask)),
            "approx_kl": _metric(masked_mean(ratio - 1.0 - log_ratio, mask)),
            "ratio_mean": _metric(masked_mean(ratio, mask)),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss, token-level masked mean: all inputs (B, T) -> (loss (), {"vf_clipfrac"}).

    0.5 * max((v - R)^2, (v_clip - R)^2) with v_clip = old_v + clip(v - old_v, -clip, clip): the
    value head may not move more than `clip` from its rollout-time estimate per update, as in the
    PPO reference implementation (OpenAI baselines ppo2; Schulman et al. 2017). Engstrom et al.
    2020 ("Implementation Matters in Deep Policy Gradients") find this clipping does not reliably
    help, so clip=0 disables it: 0.5 * (v - R)^2. Note the clip is in reward units, so it should
    scale with the reward scale. old_values and returns are treated as constants (detached).

    vf_clipfrac = fraction of kept tokens where the clipped term is strictly larger (and so taken,
    with zero gradient); 0 when clipping is off.
    """
    if clip < 0:
        raise ValueError(f"value clip must be >= 0 (0 disables it), got {clip}")
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns) ** 2
    if clip == 0:
        return 0.5 * masked_mean(unclipped, mask), {"vf_clipfrac": _metric(values.new_zeros(()))}
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"vf_clipfrac": _metric(masked_mean((clipped > unclipped).float(), mask))}
