"""KL penalties against a reference policy, KL coefficient controllers and reward shaping, in pure torch.

What this is: the per-token KL estimate between the policy and a frozen reference model, the
controllers that set its weight (fixed, or adaptive as in Ziegler et al. 2019), and the function
that turns a sequence score plus per-token KL into per-token rewards for the advantage estimators.

What this is not: no model forward and no cross-rank reduction. The KL fed to an adaptive
controller is whatever statistic the caller reduced (usually the batch mean of per-sequence KL
sums); all-reducing it across ranks first keeps the coefficient identical on every rank.

Conventions: B batch, T response positions (right-padded). `mask` (B, T) is 1/True on real
response tokens, contiguous from position 0 in each row. Sequence-level scores are (B,).
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")

# exp(20) ~ 4.9e8 is finite in float32 (overflow is at ~88.7). A log-ratio beyond +-20 means one
# policy gives the token e^20 times the probability of the other: the estimate is meaningless
# there anyway, and clamping keeps a single such token (e.g. a -inf log-prob from a sampler that
# disagrees with the trainer) from turning the whole batch's reward or loss into inf/NaN.
K3_LOG_RATIO_CLAMP = 20.0


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs: (B, T), (B, T) -> (B, T).

    Schulman 2020, "Approximating KL divergence", with x ~ pi and log-ratio l = logp - ref:
    - "k1": l. Unbiased, but negative for some tokens and high variance.
    - "k2": 0.5 * l^2. Biased (low bias near pi = pi_ref), always >= 0.
    - "k3": exp(-l) - 1 + l = (pi_ref/pi - 1) - log(pi_ref/pi). Unbiased and always >= 0; its
      log-ratio is clamped to [-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP] (see that constant), so
      tokens beyond the clamp get no gradient.

    With `mask`, positions where it is 0 give 0, and inf/NaN there reach neither the output nor
    the gradient: the log-ratio is selected away with `torch.where` before any nonlinearity (a
    NaN that entered exp() would come back as NaN * 0 = NaN in the backward pass). The result is
    at least float32. Gradients flow into both inputs; detach `ref_logprobs` if that matters.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, ref_logprobs.dtype), torch.float32)
    log_ratio = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if mask is not None:
        if mask.shape != log_ratio.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of logprobs {tuple(log_ratio.shape)}")
        # every estimator is 0 at log-ratio 0, so this also zeroes the output at masked positions
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros((), dtype=dtype, device=log_ratio.device))
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    neg = torch.clamp(-log_ratio, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # log(pi_ref / pi)
    return torch.exp(neg) - 1.0 - neg


# -------------------------------------------------------------------------------------- controllers


class FixedKLController:
    """A constant KL coefficient: `.value` never changes under `update`.

    Same interface as `AdaptiveKLController`, so a trainer handles both the same way. The
    coefficient is still saved and restored by `state_dict`/`load_state_dict`: a resumed run gets
    the saved value, whatever the config says now.
    """

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"kl coef must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; arguments as `AdaptiveKLController.update`."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient steered towards a target KL, Ziegler et al. 2019 ("Fine-Tuning Language
    Models from Human Preferences"), sec. 2.2.

    After each batch: e = clip(KL / target - 1, -0.2, 0.2) and coef *= 1 + e * n_steps / horizon.
    The proportional error is clipped so one outlier batch moves the coefficient by at most
    20% * n_steps / horizon. `n_steps` and `horizon` are in the same unit; in the paper's code
    (lm-human-preferences) n_steps is the number of samples in the batch and horizon = 10000
    samples, so the coefficient reacts on a time scale of `horizon` samples whatever the batch size.
    `current_kl` is the per-sequence KL (summed over tokens, averaged over sequences), the
    quantity `target` is expressed in (the paper's target is 6 nats).
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if init_coef < 0:
            raise ValueError(f"kl init_coef must be >= 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"kl target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"kl horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """Only the coefficient is state; target and horizon come from the (possibly new) config."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(
    coef: float, adaptive: bool = False, target: float | None = None, horizon: int = 10000
) -> KLController:
    """`AdaptiveKLController(coef, target, horizon)` if `adaptive`, else `FixedKLController(coef)`."""
    if not adaptive:
        return FixedKLController(coef)
    if target is None:
        raise ValueError("an adaptive kl controller needs a target")
    return AdaptiveKLController(coef, target, horizon)


# ---------------------------------------------------------------------------------- reward shaping


def response_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Kept tokens per row, (B, T) -> (B,) long; ValueError if the mask is not a prefix per row.

    Every per-token recursion here assumes the kept tokens of a row are positions 0..len-1 (the
    value after the last kept token is 0, the score lands at index len - 1). A left-padded or
    holed mask would silently put the score on the wrong token, so it is rejected instead.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    kept = mask.bool()
    lengths = kept.sum(-1)
    prefix = torch.arange(kept.shape[1], device=kept.device)[None, :] < lengths[:, None]
    if not torch.equal(kept, prefix):
        raise ValueError("mask must be contiguous from position 0 in every row (right padding)")
    return lengths


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor | None, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards from sequence scores and a KL penalty: (B,), (B, T), (B, T) -> (B, T).

    r_t = -kl_coef * kl_t on every kept token, plus the score at the last kept token
    (index mask.sum(-1) - 1), 0 at masked positions: the per-token reward of Ziegler et al. 2019
    (eq. 2, R(x, y) = r(x, y) - beta * KL) spread over tokens as in InstructGPT (Ouyang et al.
    2022) so each token is charged its own KL. `kl=None` or kl_coef=0 means no penalty (and kl is
    then not read, so it may hold anything). Rows with no kept token have nowhere to put the score
    and raise ValueError. The result is at least float32 and carries no gradient: rewards are
    constants to every advantage estimator.
    """
    lengths = response_lengths(mask)
    if scores.shape != lengths.shape:
        raise ValueError(f"scores must be (B,) = {tuple(lengths.shape)}, got {tuple(scores.shape)}")
    if bool((lengths == 0).any()):
        raise ValueError("every row needs at least one kept token to receive its score")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    kept = mask.bool()
    if kl is None or kl_coef == 0:
        rewards = torch.zeros(kept.shape, dtype=dtype, device=scores.device)
    else:
        if kl.shape != kept.shape:
            raise ValueError(f"kl {tuple(kl.shape)} must have the shape of mask {tuple(kept.shape)}")
        dtype = torch.promote_types(dtype, kl.dtype)
        penalty = -kl_coef * kl.detach().to(dtype)
        rewards = torch.where(kept, penalty, torch.zeros((), dtype=dtype, device=penalty.device))
    last = (lengths - 1)[:, None]
    return rewards.scatter_add(-1, last, scores.detach().to(dtype)[:, None])
