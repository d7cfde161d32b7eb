"""The GRPO-family variants against hand-computed values: GSPO, CISPO, DAPO's dynamic-sampling filter and
overlong punishment, Dr. GRPO (advantages and the seq_sum_norm aggregation), masked IS, pass@k."""

import math

import pytest
import torch

from rlhf_system.algorithms.advantages import compute_advantages
from rlhf_system.algorithms.grpo_family import (
    informative_groups,
    overlong_penalty,
    policy_loss_cispo,
    policy_loss_gspo,
)
from rlhf_system.algorithms.losses import aggregate_loss, masked_is_weights, policy_loss_ppo
from rlhf_system.eval.generation import pass_at_k, sampled_score


def close(actual, expected, tol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), (actual, expected)


def test_gspo_one_ratio_per_sequence_clipped_as_a_whole():
    # row 0: token log-ratios 0.1, -0.3 (third position padding): mean -0.1, s = e^-0.1 = 0.904837, inside
    #        [0.8, 1.2]: loss per token -A s = -0.904837 for A = 1.
    # row 1: log-ratios 0.5 x 3: s = e^0.5 = 1.648721 > 1.2 with A = 1: clipped, loss -1.2, no gradient.
    # "seq" aggregation: mean of the row means = (-0.904837 - 1.2) / 2 = -1.0524185.
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    lp = (old + torch.tensor([[0.1, -0.3, 7.0], [0.5, 0.5, 0.5]])).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.ones(2, 3)
    loss, m = policy_loss_gspo(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.2, agg="seq")
    close(loss, (-math.exp(-0.1) - 1.2) / 2)
    loss.backward()
    # d/d lp_t of -A s_it is -A s_i (s_it = sg(s_i) pi_t / sg(pi_t)); row mean over 2 tokens, mean over 2 rows
    close(lp.grad, [[-math.exp(-0.1) / 4, -math.exp(-0.1) / 4, 0.0], [0.0, 0.0, 0.0]])
    close(m["clipfrac"], 0.5)
    close(m["ratio_mean"], (math.exp(-0.1) + math.exp(0.5)) / 2)


def test_gspo_equals_ppo_on_single_token_sequences():
    # with one token per sequence the sequence ratio is the token ratio: GSPO is PPO
    old = torch.tensor([[-1.0], [-2.0], [-0.5]])
    lp = old + torch.tensor([[0.3], [-0.1], [0.05]])
    adv = torch.tensor([[1.0], [-2.0], [0.5]])
    mask = torch.ones(3, 1)
    g, _ = policy_loss_gspo(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.2, agg="token")
    p, _ = policy_loss_ppo(lp, old, adv, mask, clip_eps=0.2)
    close(g, p)


def test_cispo_clipped_weight_keeps_the_gradient():
    # r = exp(lp - old) = [e^0.5, e^-1] = [1.648721, 0.367879]; no lower bound (clip_eps=1), top 1.28:
    # w = [1.28, 0.367879]. loss_t = -w A lp = [-1.28 * 2 * -1, -0.367879 * 2 * -2] = [2.56, 1.471518];
    # token mean 2.015759. Gradient -w A / 2 = [-1.28, -0.367879]: the clipped token still learns.
    old = torch.tensor([[-1.5, -1.0]])
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.full((1, 2), 2.0)
    loss, m = policy_loss_cispo(lp, old, adv, torch.ones(1, 2), clip_eps=1.0, clip_eps_high=0.28)
    close(loss, (2.56 + 2 * 2 * math.exp(-1.0)) / 2)
    loss.backward()
    close(lp.grad, [[-1.28, -math.exp(-1.0)]])
    close(m["clipfrac"], 0.5)
    # PPO's clip drops the first token's gradient instead (ratio above 1 + eps with A > 0)
    lp2 = lp.detach().clone().requires_grad_()
    ppo, _ = policy_loss_ppo(lp2, old, adv, torch.ones(1, 2), clip_eps=0.2, clip_eps_high=0.28)
    ppo.backward()
    assert lp2.grad[0, 0].item() == 0.0


def test_informative_groups_drop_all_equal_scores():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert informative_groups(scores, 4).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="groups of 5"):
        informative_groups(scores, 5)


def test_overlong_penalty_ramp():
    # budget 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10 and beyond (times the penalty)
    close(overlong_penalty(torch.tensor([5, 6, 7, 8, 10, 12]), max_len=10, buffer=4, penalty=2.0),
          [0.0, 0.0, -0.5, -1.0, -2.0, -2.0])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_len=10, buffer=11)


def test_dr_grpo_centres_without_std_and_sums_without_length_division():
    # scores [1, 0, 0, 0]: mean 0.25 -> [0.75, -0.25, -0.25, -0.25] (GRPO would divide by std 0.4330127)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    adv, _ = compute_advantages("dr_grpo", scores=torch.tensor([1.0, 0.0, 0.0, 0.0]), mask=mask, group_size=4)
    close(adv, [[0.75, 0.75], [-0.25, 0.0], [-0.25, -0.25], [-0.25, 0.0]])
    grpo, _ = compute_advantages("grpo", scores=torch.tensor([1.0, 0.0, 0.0, 0.0]), mask=mask, group_size=4)
    close(grpo[0, 0], 0.75 / (0.4330127 + 1e-6), tol=1e-5)
    # seq_sum_norm: row sums / budget 4 = [3/4, 3/4] (third row has no kept token: left out) -> 0.75
    per_token = torch.tensor([[1.0, 2.0, 0.0], [3.0, 9.0, 9.0], [5.0, 5.0, 5.0]])
    keep = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(aggregate_loss(per_token, keep, "seq_sum_norm", norm_len=4), 0.75)
    close(aggregate_loss(per_token, keep, "seq"), (1.5 + 3.0) / 2)
    with pytest.raises(ValueError, match="norm_len"):
        aggregate_loss(per_token, keep, "seq_sum_norm")


def test_masked_is_weights_drop_tokens_outside_the_band():
    old = torch.tensor([[0.0, math.log(3.0), math.log(0.4), math.log(1.9)]])
    rollout = torch.zeros(1, 4)
    close(masked_is_weights(old, rollout, 0.5, 2.0), [[1.0, 0.0, 0.0, 1.0]])
    close(masked_is_weights(old, rollout, 0.5, 2.0, mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]])), [[1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="band"):
        masked_is_weights(old, rollout, 0.5, 0.9)


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)        # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)       # pass@1 = c/n
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0                        # n - c < k: every draw of 3 holds a correct one
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_sampled_score_mean_and_pass_at_k_per_family():
    # two arithmetic rows, 4 samples each: row 0 has 1 correct, row 1 has 2
    rows = [{"family": "arith", "task": "add", "check": "number", "answer": "5"},
            {"family": "arith", "task": "add", "check": "number", "answer": "7"}]
    texts = ["5", "4", "3", "x", "7", "7", "1", "2"]
    out = sampled_score(rows, texts, 4, [1, 2, 4])
    assert out["all"] == out["arith"]
    # mean@4 = 3/8; pass@1 = mean(1/4, 2/4); pass@2 = mean(1 - 3/6, 1 - 1/6); pass@4 = 1 for both
    assert out["all"] == {"mean@4": 0.375, "pass@1": 0.375, "pass@2": round((0.5 + 5 / 6) / 2, 4), "pass@4": 1.0}
