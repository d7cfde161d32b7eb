"""algorithms/advantages.py against hand-computed values and naive Python-loop references.

GAE running example (one row, gamma 0.9, lam 0.5, so gamma * lam = 0.45): rewards [0, 0, 1],
values [0.5, 0.6, 0.7]. delta = [0 + 0.9 * 0.6 - 0.5, 0 + 0.9 * 0.7 - 0.6, 1 - 0.7] =
[0.04, 0.03, 0.3]; A_2 = 0.3, A_1 = 0.03 + 0.45 * 0.3 = 0.165, A_0 = 0.04 + 0.45 * 0.165 = 0.11425;
returns = A + V = [0.61425, 0.765, 1.0].
"""

import math

import pytest
import torch

from rlhf_system.algorithms.advantages import (
    compute_advantages,
    discount_matrix,
    discounted_returns,
    expand_to_tokens,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    whiten,
)
from rlhf_system.algorithms.kl import shape_rewards

NAN = float("nan")


def t(*rows):
    return torch.tensor(rows if len(rows) > 1 else [rows[0]], dtype=torch.float32)


def ragged(B, T, seed, min_len=1):
    """Random rewards/values (float64) with NaN under a right-padded mask of random lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, T + 1, (B,), generator=g)
    lengths[0] = T  # one full row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64).masked_fill(~mask, NAN)
    values = torch.randn(B, T, generator=g, dtype=torch.float64).masked_fill(~mask, NAN)
    return rewards, values, mask


def loop_gae(rewards, values, mask, gamma, lam):
    """Textbook backward recursion, one row and one step at a time."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for i in reversed(range(n)):
            next_v = float(values[b, i + 1]) if i + 1 < n else 0.0
            delta = float(rewards[b, i]) + gamma * next_v - float(values[b, i])
            last = delta + gamma * lam * last
            adv[b, i] = last
    ret = torch.where(mask, adv + torch.nan_to_num(values), torch.zeros(()))
    return adv, ret


def loop_returns(rewards, mask, gamma):
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        running = 0.0
        for i in reversed(range(int(mask[b].sum()))):
            running = float(rewards[b, i]) + gamma * running
            out[b, i] = running
    return out


# ----------------------------------------------------------------------------------- building blocks


def test_whiten_hand_values_ignores_masked_positions():
    x = t([1.0, 2.0, 3.0], [4.0, NAN, 1e9])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # kept [1, 2, 3, 4]: mean 2.5, population variance 1.25
    s = math.sqrt(1.25)
    torch.testing.assert_close(whiten(x, mask), t([-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]))
    torch.testing.assert_close(
        whiten(x, mask, shift_mean=False), t([2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s], [2.5 + 1.5 / s, 0.0, 0.0])
    )


def test_whiten_degenerate_inputs_are_finite():
    assert whiten(t([3.0, 3.0]), torch.ones(1, 2)).abs().max() == 0  # zero variance
    assert whiten(t([NAN, NAN]), torch.zeros(1, 2)).abs().max() == 0  # nothing kept


def test_discount_matrix_hand_values():
    torch.testing.assert_close(discount_matrix(3, 0.5), torch.tensor([[1.0, 0.5, 0.25], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(discount_matrix(3, 0.0), torch.eye(3))


def test_expand_to_tokens():
    out = expand_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(out, t([2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]))


# ------------------------------------------------------------------------------------- GAE, returns


def test_gae_hand_values_with_ragged_row():
    rewards = t([0.0, 0.0, 1.0], [0.0, 2.0, NAN])
    values = t([0.5, 0.6, 0.7], [1.0, 1.0, NAN])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 1: delta = [0 + 0.9 * 1 - 1, 2 + 0 - 1] = [-0.1, 1]; A = [-0.1 + 0.45, 1]
    torch.testing.assert_close(adv, t([0.11425, 0.165, 0.3], [0.35, 1.0, 0.0]))
    torch.testing.assert_close(ret, t([0.61425, 0.765, 1.0], [1.35, 2.0, 0.0]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 1.0), (0.0, 0.5)])
def test_gae_matches_loop_reference_on_ragged_masks(gamma, lam):
    rewards, values, mask = ragged(6, 17, seed=int(gamma * 100 + lam * 10))
    mask[3] = False  # an empty row is allowed here and gives zeros
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = loop_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_gae_long_sequence_is_stable():
    # 0.95^-2000 ~ 1e44 would overflow a rescaled-cumsum implementation in float32
    rewards, values, mask = ragged(2, 2000, seed=7, min_len=1500)
    adv, ret = gae(rewards.float(), values.float(), mask, gamma=0.99, lam=0.95)
    ref_adv, ref_ret = loop_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-4, rtol=1e-4)


def test_gae_lambda_one_gamma_one_zero_values_is_reward_to_go():
    rewards, _, mask = ragged(5, 9, seed=3)
    adv, ret = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    rtg = torch.flip(torch.cumsum(torch.flip(torch.nan_to_num(rewards), [1]), 1), [1]).masked_fill(~mask, 0)
    torch.testing.assert_close(adv, rtg)
    torch.testing.assert_close(ret, rtg)
    torch.testing.assert_close(discounted_returns(rewards, mask, 1.0), rtg)


def test_discounted_returns_hand_values_and_loop_reference():
    # [1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3]
    torch.testing.assert_close(discounted_returns(t([1.0, 2.0, 3.0]), torch.ones(1, 3), 0.5), t([2.75, 3.5, 3.0]))
    rewards, _, mask = ragged(7, 13, seed=11)
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.97), loop_returns(rewards, mask, 0.97))


def test_gae_outputs_no_gradient_and_validates():
    rewards = torch.ones(1, 3, requires_grad=True)
    values = torch.ones(1, 3, requires_grad=True)
    adv, ret = gae(rewards, values, torch.ones(1, 3), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="gamma"):
        gae(rewards, values, torch.ones(1, 3), 1.5, 0.95)
    with pytest.raises(ValueError, match="lam"):
        gae(rewards, values, torch.ones(1, 3), 1.0, -0.1)
    with pytest.raises(ValueError, match="contiguous"):
        gae(rewards, values, torch.tensor([[0, 1, 1]]), 1.0, 0.95)


# --------------------------------------------------------------------------------- group estimators


def test_grpo_hand_values():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 0: mean 0.5, population std 0.5; group 1: all equal -> 0
    a = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(grpo_advantages(scores, 4), torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(
        grpo_advantages(scores, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    )
    # population std of [0, 3] is 1.5 (the sample std would be 2.12 and give +-0.707)
    torch.testing.assert_close(grpo_advantages(torch.tensor([0.0, 3.0]), 2, eps=0.0), torch.tensor([-1.0, 1.0]))


def test_grpo_groups_have_zero_mean_and_unit_std():
    scores = torch.randn(24, generator=torch.Generator().manual_seed(0))
    adv = grpo_advantages(scores, 6).view(4, 6)
    torch.testing.assert_close(adv.mean(-1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(-1, unbiased=False), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(grpo_advantages(scores, 6, scale=False).view(4, 6).mean(-1), torch.zeros(4),
                               atol=1e-6, rtol=0)


def test_rloo_hand_values_and_leave_one_out_formula():
    # [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2]
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-3.0, -1.5, 4.5]))
    scores = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = 5
    expected = torch.tensor([
        float(scores[i]) - sum(float(scores[j]) for j in range(i // G * G, i // G * G + G) if j != i) / (G - 1)
        for i in range(20)
    ], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(scores, G), expected)


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_estimators_validate(fn):
    with pytest.raises(ValueError, match="groups of 4"):
        fn(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        fn(torch.zeros(6), 1)


# ------------------------------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_hand_values():
    rewards = t([0.0, 0.0, 1.0], [0.0, 2.0, NAN])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # returns-to-go (gamma 1): [[1, 1, 1], [2, 2, -]]; kept mean 1.4, variance (3 * 0.16 + 2 * 0.36) / 5 = 0.24
    s = math.sqrt(0.24)
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, 1.0), t([-0.4 / s] * 3, [0.6 / s, 0.6 / s, 0.0]))


def test_reinforce_pp_baseline_hand_values():
    scores = torch.tensor([1.0, 3.0])  # one group of 2: centred [-1, 1]
    penalty = t([0.1, 0.1], [0.2, NAN])
    mask = torch.tensor([[1, 1], [1, 0]])
    # token rewards [[-0.1, -1 - 0.1], [1 - 0.2, 0]] -> returns [[-1.2, -1.1], [0.8, 0]]
    # kept mean -0.5, deviations [-0.7, -0.6, 1.3], population variance 2.54 / 3
    s = math.sqrt(2.54 / 3)
    out = reinforce_pp_baseline_advantages(scores, penalty, mask, group_size=2)
    torch.testing.assert_close(out, t([-0.7 / s, -0.6 / s], [1.3 / s, 0.0]))


# ------------------------------------------------------------------------------------- dispatcher


def batch(seed=0, B=4, T=6):
    """Scores (B,), a ragged mask, values and kl with NaN at masked positions."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.tensor([T, 2, 5, 1])[:B, None]
    scores = torch.randn(B, generator=g)
    values = torch.randn(B, T, generator=g).masked_fill(~mask, NAN)
    kl = torch.rand(B, T, generator=g).masked_fill(~mask, NAN)
    return scores, mask, values, kl


def test_compute_advantages_gae_is_shaping_then_gae_then_whitening():
    scores, mask, values, kl = batch()
    adv, ret = compute_advantages("gae", scores=scores, mask=mask, values=values, kl=kl, kl_coef=0.1,
                                  gamma=0.99, lam=0.9)
    ref_adv, ref_ret = gae(shape_rewards(scores, kl, mask, 0.1), values, mask, 0.99, 0.9)
    torch.testing.assert_close(adv, whiten(ref_adv, mask))
    torch.testing.assert_close(ret, ref_ret)
    raw, _ = compute_advantages("gae", scores=scores, mask=mask, values=values, kl=kl, kl_coef=0.1,
                                gamma=0.99, lam=0.9, whiten_advantages=False)
    torch.testing.assert_close(raw, ref_adv)
    # KL as a loss instead: the reward carries no penalty
    no_kl, _ = compute_advantages("gae", scores=scores, mask=mask, values=values, kl=kl, kl_coef=0.1,
                                  kl_in_reward=False, whiten_advantages=False)
    torch.testing.assert_close(no_kl, gae(shape_rewards(scores, None, mask, 0.0), values, mask, 1.0, 0.95)[0])


def test_compute_advantages_grpo_ignores_kl_and_is_not_whitened():
    scores, mask, _, kl = batch()
    adv, ret = compute_advantages("grpo", scores=scores, mask=mask, kl=kl, kl_coef=0.5, group_size=2)
    assert ret is None
    torch.testing.assert_close(adv, expand_to_tokens(grpo_advantages(scores, 2), mask))


def test_compute_advantages_rloo_puts_kl_in_the_sequence_reward():
    scores = torch.tensor([1.0, 2.0])
    kl = t([0.5, 1.5], [1.0, NAN])
    mask = torch.tensor([[1, 1], [1, 0]])
    # sequence rewards [1 - 0.5 * 2, 2 - 0.5 * 1] = [0, 1.5]; leave-one-out: [-1.5, 1.5]
    adv, ret = compute_advantages("rloo", scores=scores, mask=mask, kl=kl, kl_coef=0.5, group_size=2,
                                  whiten_advantages=False)
    assert ret is None
    torch.testing.assert_close(adv, t([-1.5, -1.5], [1.5, 0.0]))
    white, _ = compute_advantages("rloo", scores=scores, mask=mask, kl=kl, kl_coef=0.5, group_size=2)
    torch.testing.assert_close(white, whiten(adv, mask))


def test_compute_advantages_reinforce_variants():
    scores, mask, _, kl = batch()
    adv, ret = compute_advantages("reinforce_pp", scores=scores, mask=mask, kl=kl, kl_coef=0.1, gamma=0.9)
    assert ret is None
    torch.testing.assert_close(adv, reinforce_pp_advantages(shape_rewards(scores, kl, mask, 0.1), mask, 0.9))
    adv, ret = compute_advantages("reinforce_pp_baseline", scores=scores, mask=mask, kl=kl, kl_coef=0.1, group_size=2)
    assert ret is None
    torch.testing.assert_close(adv, reinforce_pp_baseline_advantages(scores, 0.1 * kl, mask, 2))


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_compute_advantages_masked_positions_never_leak(estimator):
    scores, mask, values, kl = batch(seed=5)
    values.requires_grad_()
    adv, ret = compute_advantages(estimator, scores=scores, mask=mask, values=values, kl=kl, kl_coef=0.2,
                                  group_size=2)
    assert torch.isfinite(adv).all() and (adv[~mask] == 0).all()
    assert not adv.requires_grad
    if ret is not None:
        assert torch.isfinite(ret).all() and (ret[~mask] == 0).all() and not ret.requires_grad
    # 1e6 instead of NaN at masked positions changes nothing
    big_values, big_kl = values.detach().masked_fill(~mask, 1e6), kl.masked_fill(~mask, 1e6)
    adv2, _ = compute_advantages(estimator, scores=scores, mask=mask, values=big_values, kl=big_kl, kl_coef=0.2,
                                 group_size=2)
    torch.testing.assert_close(adv2, adv)


def test_compute_advantages_validates():
    scores, mask, values, _ = batch()
    with pytest.raises(ValueError, match="gae.*grpo"):
        compute_advantages("ppo", scores=scores, mask=mask)
    with pytest.raises(ValueError, match="critic values"):
        compute_advantages("gae", scores=scores, mask=mask)
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages("grpo", scores=scores, mask=mask)
