"""algorithms/losses.py against hand-computed values.

Reference numbers: -log sigmoid(x) = log(1 + e^-x): x=2 -> 0.126928011, x=1 -> 0.313261688,
x=0 -> ln 2 = 0.693147181, x=-1 -> 1.313261688. Logits [0, ln 2, ln 3] give softmax [1/6, 1/3, 1/2].
"""

import math

import pytest
import torch

from rlhf_system.algorithms.losses import (
    aggregate_loss,
    dpo_loss,
    dpo_nll,
    kl_loss,
    pairwise_rm_loss,
    policy_loss_ppo,
    sequence_logps,
    sft_loss,
    sft_loss_sum,
    truncated_is_weights,
    value_loss,
)

LN2, LN3 = math.log(2), math.log(3)
NLS2, NLS1, NLS0, NLSM1 = 0.126928011, 0.313261688, 0.693147181, 1.313261688


def close(actual, expected, tol=1e-6):
    assert float(torch.as_tensor(actual).detach()) == pytest.approx(expected, abs=tol)


def same_logits(b: int, t: int) -> torch.Tensor:
    """(b, t, 3) logits, each position [0, ln 2, ln 3]: NLL of token 0/1/2 = ln 6, ln 3, ln 2."""
    return torch.tensor([0.0, LN2, LN3]).expand(b, t, 3).clone()


# --------------------------------------------------------------------------------------------- SFT


def test_sft_loss_hand_example_and_shift():
    ids = torch.tensor([[2, 0, 1, 2]])
    # Tokens 2 (id 1, NLL ln 3) and 3 (id 2, NLL ln 2) are trained. Token 0's mask is 1 but
    # nothing predicts token 0, so it is ignored; token 1 (id 0, NLL ln 6) is not trained.
    loss, m = sft_loss(same_logits(1, 4), ids, torch.tensor([[1, 0, 1, 1]]))
    close(loss, (LN3 + LN2) / 2)  # 0.895879735
    assert m["tokens"].item() == 2
    loss0, m0 = sft_loss(same_logits(1, 4), ids, torch.tensor([[0, 0, 1, 1]]))
    assert loss0.item() == loss.item() and m0["tokens"].item() == 2


def test_sft_loss_is_token_level_mean_over_batch():
    ids = torch.tensor([[0, 1, 0, 0], [0, 2, 2, 2]])
    mask = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1]])
    loss, m = sft_loss(same_logits(2, 4), ids, mask)
    # 1 token at ln 3 and 3 tokens at ln 2: token mean (ln 3 + 3 ln 2) / 4, not the sample mean
    # (ln 3 + ln 2) / 2 = 0.8959.
    close(loss, 0.794513458)
    assert m["tokens"].item() == 4


def test_sft_loss_all_zero_mask_is_zero_not_nan():
    logits = same_logits(2, 3).requires_grad_()
    loss, m = sft_loss(logits, torch.tensor([[0, 1, 2], [2, 1, 0]]), torch.zeros(2, 3, dtype=torch.long))
    assert loss.item() == 0.0 and m["tokens"].item() == 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_sft_loss_gradient_only_at_positions_predicting_trained_tokens():
    logits = same_logits(1, 4).requires_grad_()
    loss, _ = sft_loss(logits, torch.tensor([[2, 0, 1, 2]]), torch.tensor([[1, 0, 1, 1]]))
    loss.backward()
    g = logits.grad[0]
    # position 0 predicts untrained token 1; position 3 predicts nothing.
    assert torch.equal(g[0], torch.zeros(3)) and torch.equal(g[3], torch.zeros(3))
    # position 1 predicts id 1: (softmax - onehot(1)) / 2 tokens = [1/12, -1/3, 1/4]
    torch.testing.assert_close(g[1], torch.tensor([1 / 12, -1 / 3, 1 / 4]))
    # position 2 predicts id 2: ([1/6, 1/3, 1/2] - [0, 0, 1]) / 2
    torch.testing.assert_close(g[2], torch.tensor([1 / 12, 1 / 6, -1 / 4]))


def test_sft_loss_sum_hand_values():
    total, n = sft_loss_sum(same_logits(1, 4), torch.tensor([[2, 0, 1, 2]]), torch.tensor([[1, 0, 1, 1]]))
    close(total, LN3 + LN2)  # 1.791759469
    assert n.item() == 2 and n.dtype == torch.long


def test_sft_loss_sum_makes_grad_accumulation_match_one_big_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 5, generator=g)
    ids = torch.randint(0, 5, (4, 6), generator=g)
    # very different trained-token counts per micro-batch: 1 + 2 tokens vs 5 + 4 tokens
    mask = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1],
                         [0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])

    big = logits.clone().requires_grad_()
    ref, _ = sft_loss(big, ids, mask)
    ref.backward()

    micro = logits.clone().requires_grad_()
    parts = [sft_loss_sum(micro[i:i + 2], ids[i:i + 2], mask[i:i + 2]) for i in (0, 2)]
    n_global = sum(n for _, n in parts)
    assert n_global.item() == 12
    acc = sum(s / n_global for s, _ in parts)
    acc.backward()
    torch.testing.assert_close(acc, ref)
    torch.testing.assert_close(micro.grad, big.grad)
    # The naive mean of per-micro-batch means weighs the 3 short tokens as much as the 9 long ones.
    naive = sum(sft_loss(logits[i:i + 2], ids[i:i + 2], mask[i:i + 2])[0] for i in (0, 2)) / 2
    assert abs(naive.item() - ref.item()) > 1e-3


# ------------------------------------------------------------------------------------ reward model


def test_pairwise_rm_loss_hand_values():
    loss, m = pairwise_rm_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    close(loss, (NLS2 + NLS0) / 2)  # 0.410037596
    close(m["accuracy"], 0.5)  # the tie does not count
    close(m["margin_mean"], 1.0)


def test_pairwise_rm_loss_with_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    loss, m = pairwise_rm_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    close(loss, (NLS1 + NLS0) / 2)  # 0.503204434
    loss, m = pairwise_rm_loss(chosen, rejected, margin=1.0)
    close(loss, (NLS1 + NLSM1) / 2)  # 0.813261688
    close(m["accuracy"], 0.5)  # metrics describe the rewards, not the margin
    close(m["margin_mean"], 1.0)


def test_pairwise_rm_loss_gradient_and_stability():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    pairwise_rm_loss(chosen, torch.tensor([0.0, 0.0]))[0].backward()
    # d/dr_c of -log sigmoid(d) = -sigmoid(-d), halved by the mean
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.119202922 / 2, -0.25]))
    loss, _ = pairwise_rm_loss(torch.tensor([-1000.0, 1000.0]), torch.tensor([0.0, 0.0]))
    close(loss, 500.0, tol=1e-3)  # (1000 + 0) / 2, finite


# ------------------------------------------------------------------------------------------- DPO


def dpo_inputs(requires_grad=False):
    """Pair 0: h = (-10 + 12) - 0 = 2. Pair 1: h = (-6 + 5) - (-5 + 6) = -2."""
    def t(*v):
        return torch.tensor(v, requires_grad=requires_grad)

    return t(-10.0, -6.0), t(-12.0, -5.0), t(-11.0, -5.0), t(-11.0, -6.0)


def test_dpo_sigmoid_hand_values():
    loss, m = dpo_loss(*dpo_inputs(), beta=0.5)
    close(loss, (NLS1 + NLSM1) / 2)  # beta * h = +1 and -1 -> 0.813261688
    # pair 0: rewards 0.5 * (1, -1); pair 1: 0.5 * (-1, 1)
    close(m["rewards_chosen"], 0.0)
    close(m["rewards_rejected"], 0.0)
    close(m["reward_accuracy"], 0.5)
    close(m["reward_margin"], 0.0)
    _, m = dpo_loss(*(x[:1] for x in dpo_inputs()), beta=0.5)
    close(m["rewards_chosen"], 0.5)
    close(m["rewards_rejected"], -0.5)
    close(m["reward_accuracy"], 1.0)
    close(m["reward_margin"], 1.0)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_policy_equal_to_reference_is_log2(beta):
    logps = torch.tensor([-3.0, -7.0], requires_grad=True)
    other = torch.tensor([-4.0, -1.0])
    loss, m = dpo_loss(logps, other, logps.detach(), other, beta=beta)
    close(loss, LN2)
    close(m["reward_margin"], 0.0)
    loss.backward()
    # d/d pi_c of -log sigmoid(beta h) at h=0 is -beta/2, halved by the batch mean
    torch.testing.assert_close(logps.grad, torch.full((2,), -beta / 4))


def test_dpo_label_smoothing_hand_values():
    pc, pr, rc, rr = (x[:1] for x in dpo_inputs())
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    close(loss, 0.9 * NLS1 + 0.1 * NLSM1)  # 0.413261688


def test_dpo_ipo_hand_values():
    pc, pr, rc, rr = (x[:1] for x in dpo_inputs())  # h = 2
    close(dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")[0], 1.0)  # target 1/(2 beta) = 1: (2 - 1)^2
    close(dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")[0], 9.0)  # (2 - 5)^2
    close(dpo_loss(pc, pr, pc, pr, beta=0.5, loss_type="ipo")[0], 1.0)  # policy == ref: (0 - 1)^2


def test_dpo_reference_gets_no_gradient():
    pc, pr, rc, rr = dpo_inputs(requires_grad=True)
    dpo_loss(pc, pr, rc, rr, beta=0.5)[0].backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad is not None and pr.grad is not None


def test_dpo_validates_arguments():
    args = dpo_inputs()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(*args, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, beta=0.0)


def test_sequence_logps_and_dpo_nll():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, float("-inf")]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    torch.testing.assert_close(sequence_logps(token_logps, mask), torch.tensor([-3.0, -0.5]))
    close(dpo_nll(token_logps, mask), (1 + 2 + 0.5) / 3)
    close(dpo_nll(token_logps, torch.tensor([[1, 1, 1], [0, 1, 0]])), (6 + 0.5) / 4)


# ------------------------------------------------------------------------------------------- PPO


def ppo_case(ratios, advantages, mask=None):
    old = torch.full((1, len(ratios)), -2.0)
    new = (old + torch.log(torch.tensor([ratios]))).requires_grad_()
    adv = torch.tensor([advantages])
    mask = torch.ones_like(adv, dtype=torch.long) if mask is None else torch.tensor([mask])
    return new, old, adv, mask


def test_ppo_inside_clip_range_is_plain_surrogate():
    new, old, adv, mask = ppo_case([1.1, 1.1], [2.0, -1.0])
    loss, m = policy_loss_ppo(new, old, adv, mask)
    close(loss, (-2.2 + 1.1) / 2)  # -A * ratio, averaged
    close(m["clipfrac"], 0.0)
    close(m["ratio_mean"], 1.1)


def test_ppo_outside_clip_range_is_pessimistic():
    new, old, adv, mask = ppo_case([1.5, 1.5, 0.5, 0.5], [1.0, -1.0, 1.0, -1.0])
    loss, m = policy_loss_ppo(new, old, adv, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r)): [-1.2 (clipped), 1.5, -0.5, 0.8 (clipped)]
    close(loss, (-1.2 + 1.5 - 0.5 + 0.8) / 4)  # 0.15
    close(m["clipfrac"], 0.5)
    close(m["ratio_mean"], 1.0)
    close(m["approx_kl"], 0.143841036)  # mean of r - 1 - ln r: 0.094534892 (r=1.5), 0.193147181 (r=0.5)
    loss.backward()
    # d/dlogp of -A r / 4 = -A r / 4 on unclipped tokens; clipped tokens get no gradient
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 0.375, -0.125, 0.0]]))


def test_ppo_ignores_masked_positions():
    new, old, adv, mask = ppo_case([1.5, 1.5, 0.5, 0.5, 150.0], [1.0, -1.0, 1.0, -1.0, -100.0], [1, 1, 1, 1, 0])
    loss, m = policy_loss_ppo(new, old, adv, mask)
    close(loss, 0.15)
    close(m["clipfrac"], 0.5)
    close(m["ratio_mean"], 1.0)
    loss.backward()
    assert new.grad[0, 4].item() == 0.0


def test_ppo_asymmetric_clip():
    new, old, adv, mask = ppo_case([1.25, 0.75], [1.0, -1.0])
    loss, m = policy_loss_ppo(new, old, adv, mask, clip_eps=0.2)
    close(loss, (-1.2 + 0.8) / 2)  # both clipped
    close(m["clipfrac"], 1.0)
    loss, m = policy_loss_ppo(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    close(loss, (-1.25 + 0.8) / 2)  # 1.25 < 1.28 now inside; the low bound is still 0.8
    close(m["clipfrac"], 0.5)


def test_ppo_default_high_clip_equals_low():
    new, old, adv, mask = ppo_case([1.5, 0.5], [1.0, -1.0])
    a = policy_loss_ppo(new, old, adv, mask, clip_eps=0.3)[0]
    b = policy_loss_ppo(new, old, adv, mask, clip_eps=0.3, clip_eps_high=0.3)[0]
    assert a.item() == b.item()
    close(a, (-1.3 + 0.7) / 2)


def test_ppo_on_policy_full_gradient():
    # ratio 1 exactly (first epoch): gradient is -A / n everywhere, nothing clipped, kl 0
    new, old, adv, mask = ppo_case([1.0, 1.0], [2.0, -1.0])
    loss, m = policy_loss_ppo(new, old, adv, mask)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-1.0, 0.5]]))
    close(m["approx_kl"], 0.0)
    close(m["clipfrac"], 0.0)


VALUES = [1.0, 2.0, 0.0]
OLD = torch.tensor([[0.5, 1.0, 0.0]])
RETURNS = torch.tensor([[2.0, 0.0, 1.0]])


def test_value_loss_clipped_hand_values():
    # v_clip = old + clip(v - old, +-0.2) = [0.7, 1.2, 0.0]
    # (v - R)^2 = [1, 4, 1]; (v_clip - R)^2 = [1.69, 1.44, 1]; max = [1.69 (clipped), 4, 1]
    values = torch.tensor([VALUES], requires_grad=True)
    loss, m = value_loss(values, OLD, RETURNS, torch.ones(1, 3, dtype=torch.long), clip=0.2)
    close(loss, 0.5 * (1.69 + 4 + 1) / 3)  # 1.115
    close(m["vf_clipfrac"], 1 / 3)
    loss.backward()
    # d/dv of 0.5 (v - R)^2 / 3 = (v - R) / 3 on unclipped entries; the clipped one gets none
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 2 / 3, -1 / 3]]))


def test_value_loss_unclipped_and_masked():
    values = torch.tensor([VALUES])
    loss, m = value_loss(values, OLD, RETURNS, torch.ones(1, 3), clip=0.0)
    close(loss, 0.5 * (1 + 4 + 1) / 3)  # 1.0
    close(m["vf_clipfrac"], 0.0)
    loss, m = value_loss(values, OLD, RETURNS, torch.tensor([[1, 1, 0]]), clip=0.2)
    close(loss, 0.5 * (1.69 + 4) / 2)  # 1.4225
    close(m["vf_clipfrac"], 0.5)
    with pytest.raises(ValueError, match="clip"):
        value_loss(values, OLD, RETURNS, torch.ones(1, 3), clip=-0.1)


# ------------------------------------------------------------------ PPO: dual clip, agg, IS weights


def test_ppo_dual_clip_hand_values():
    new, old, adv, mask = ppo_case([3.0, 1.5, 3.0], [-1.0, -1.0, 1.0])
    loss, m = policy_loss_ppo(new, old, adv, mask)
    close(loss, (3.0 + 1.5 - 1.2) / 3)  # max(-A r, -A clip(r)) = [3, 1.5, -1.2]
    assert "dual_clipfrac" not in m
    loss, m = policy_loss_ppo(new, old, adv, mask, dual_clip=2.0)
    # token 0 (A < 0, loss 3 > -c A = 2) is capped at 2; token 1 (1.5 < 2) and A > 0 are unchanged
    close(loss, (2.0 + 1.5 - 1.2) / 3)
    close(m["dual_clipfrac"], 1 / 3)
    close(m["clipfrac"], 1 / 3)  # the standard clip metric is unchanged
    loss.backward()
    # capped token: constant, no gradient; token 1: d/dlogp of -A r / 3 = 1.5 / 3
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 0.5, 0.0]]))
    assert "dual_clipfrac" not in policy_loss_ppo(new, old, adv, mask, dual_clip=0)[1]  # 0 is off, as in the config


def test_ppo_dual_clip_bounds_negative_advantage_loss():
    g = torch.Generator().manual_seed(0)
    old = torch.zeros(4, 8)
    new = torch.randn(4, 8, generator=g) * 5  # ratios up to e^15
    adv = -torch.rand(4, 8, generator=g) - 0.1
    mask = torch.ones(4, 8)
    c = 3.0
    unbounded, _ = policy_loss_ppo(new, old, adv, mask)
    bounded, _ = policy_loss_ppo(new, old, adv, mask, dual_clip=c)
    assert unbounded.item() > (-c * adv).mean().item() >= bounded.item()
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss_ppo(new, old, adv, mask, dual_clip=0.5)


def test_ppo_seq_vs_token_agg():
    # on-policy (ratio 1): per-token loss is -A
    old = torch.zeros(3, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    ragged = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # third row empty
    token, _ = policy_loss_ppo(old.clone(), old, adv, ragged, agg="token")
    seq, _ = policy_loss_ppo(old.clone(), old, adv, ragged, agg="seq")
    close(token, -(1 + 2 + 3 + 4) / 4)  # -2.5
    close(seq, -(2 + 4) / 2)  # row means [-2, -4]; the empty row does not count
    full = torch.ones(3, 3)
    torch.testing.assert_close(policy_loss_ppo(old.clone(), old, adv, full, agg="seq")[0],
                               policy_loss_ppo(old.clone(), old, adv, full, agg="token")[0])
    with pytest.raises(ValueError, match="token.*seq"):
        policy_loss_ppo(old.clone(), old, adv, full, agg="sample")


def test_aggregate_loss_all_empty_is_zero():
    x = torch.tensor([[float("nan"), 1.0]])
    for agg in ("token", "seq"):
        assert aggregate_loss(x, torch.zeros(1, 2), agg).item() == 0.0


def test_ppo_is_weights_multiply_per_token_loss_and_are_safe_under_mask():
    new, old, adv, mask = ppo_case([1.0, 1.0, 1.0], [2.0, -1.0, 5.0], [1, 1, 0])
    w = torch.tensor([[0.5, 2.0, float("nan")]], requires_grad=True)
    loss, _ = policy_loss_ppo(new, old, adv, mask, is_weights=w)
    close(loss, (0.5 * -2.0 + 2.0 * 1.0) / 2)  # 0.5
    loss.backward()
    # d/dlogp = -A r w / 2 on kept tokens; masked token 0, not NaN; the weights get no gradient
    torch.testing.assert_close(new.grad, torch.tensor([[-0.5, 1.0, 0.0]]))
    assert w.grad is None


def test_truncated_is_weights_hand_values():
    old = torch.full((1, 4), -1.0, requires_grad=True)
    rollout = torch.tensor([[-1.0 - LN2, -1.0 + LN2, -6.0, float("nan")]])
    w = truncated_is_weights(old, rollout, cap=3.0, mask=torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 3.0, 0.0]]))  # e^5 = 148 is capped at 3
    assert not w.requires_grad
    torch.testing.assert_close(truncated_is_weights(old[:, :3], rollout[:, :3], cap=10.0)[0, 2], torch.tensor(10.0))
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, rollout, cap=0.0)


def test_value_loss_seq_agg():
    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0], [1.0, float("nan"), 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # squared errors [[1, 4, 1], [4, -, -]]
    close(value_loss(values, values, returns, mask, clip=0.0)[0], 0.5 * (1 + 4 + 1 + 4) / 4)  # 1.25
    close(value_loss(values, values, returns, mask, clip=0.0, agg="seq")[0], 0.5 * (6 / 3 + 4) / 2)  # 1.5


# ---------------------------------------------------------------------------------------- KL loss


def test_kl_loss_hand_values_and_gradient():
    logp = torch.tensor([[-1.0, -2.0, float("nan")]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0, float("nan")]], requires_grad=True)  # log-ratios [1, -1]
    mask = torch.tensor([[1, 1, 0]])
    loss, m = kl_loss(logp, ref, mask)
    close(loss, (0.367879441 + 0.718281828) / 2)  # k3: e^-1 and e - 2
    close(m["kl_mean"], (0.367879441 + 0.718281828) / 2)
    loss.backward()
    # d/dl of e^-l - 1 + l is 1 - e^-l: [1 - e^-1, 1 - e] / 2 tokens; the reference gets none
    torch.testing.assert_close(logp.grad, torch.tensor([[0.316060279, -0.859140914, 0.0]]))
    assert ref.grad is None
    close(kl_loss(logp, ref, mask, estimator="k1")[0], 0.0)


def test_kl_loss_seq_agg():
    logp = torch.tensor([[-1.0, -1.0], [-3.0, 0.0]])
    ref = torch.tensor([[-1.0, -2.0], [-1.0, 5.0]])  # k1: [[0, 1], [-2, -]]
    mask = torch.tensor([[1, 1], [1, 0]])
    close(kl_loss(logp, ref, mask, estimator="k1")[0], (0 + 1 - 2) / 3)
    close(kl_loss(logp, ref, mask, estimator="k1", agg="seq")[0], (0.5 - 2) / 2)
