"""algorithms/kl.py against hand-computed values.

Reference numbers, log-ratio l = logp - ref: k3(l) = exp(-l) - 1 + l, so k3(1) = e^-1 = 0.367879441
and k3(-1) = e - 2 = 0.718281828; k2(+-1) = 0.5.
"""

import math

import pytest
import torch

from rlhf_system.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    make_kl_controller,
    response_lengths,
    shape_rewards,
)

NAN = float("nan")
LOGP = torch.tensor([[-1.0, -2.0]])
REF = torch.tensor([[-2.0, -1.0]])  # log-ratios [1, -1]


@pytest.mark.parametrize(
    "estimator, expected",
    [("k1", [1.0, -1.0]), ("k2", [0.5, 0.5]), ("k3", [0.367879441, 0.718281828])],
)
def test_kl_penalty_hand_values(estimator, expected):
    torch.testing.assert_close(kl_penalty(LOGP, REF, estimator), torch.tensor([expected]))


def test_kl_penalty_k1_and_k3_are_unbiased_for_the_exact_kl():
    # E_{x~p}[k(x)] over a whole categorical distribution, computed exactly (no sampling).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())  # 0.240030...
    for est in ("k1", "k3"):
        k = kl_penalty(p.log()[None], q.log()[None], est)
        assert float((p * k[0]).sum()) == pytest.approx(exact, abs=1e-12)
    # k2 is biased but close when p ~ q, and never negative
    k2 = kl_penalty(p.log()[None], q.log()[None], "k2")
    assert (k2 >= 0).all() and float((p * k2[0]).sum()) != pytest.approx(exact, abs=1e-3)


def test_kl_penalty_k3_clamps_the_log_ratio():
    out = kl_penalty(torch.tensor([[0.0, -100.0, float("-inf")]]), torch.tensor([[-100.0, 0.0, 0.0]]), "k3")
    assert torch.isfinite(out).all()
    # l = 100 -> log(ref/p) clamped to -20: e^-20 - 1 + 20; l = -100 or -inf -> clamped to 20: e^20 - 21
    torch.testing.assert_close(out, torch.tensor([[19.0, math.exp(20) - 21, math.exp(20) - 21]]))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_masked_positions_do_not_leak(estimator):
    logp = torch.tensor([[-1.0, NAN, float("-inf")]], requires_grad=True)
    ref = torch.tensor([[-2.0, NAN, 5.0]])
    mask = torch.tensor([[1, 0, 0]])
    out = kl_penalty(logp, ref, estimator, mask=mask)
    assert out[0, 1].item() == 0.0 and out[0, 2].item() == 0.0
    out.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1].item() == 0.0 and logp.grad[0, 2].item() == 0.0
    assert logp.grad[0, 0].item() != 0.0  # d/dl of k1 = 1, k2 = l = 1, k3 = 1 - e^-1


def test_kl_penalty_validates():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(LOGP, REF, "k4")
    with pytest.raises(ValueError, match="differ"):
        kl_penalty(LOGP, REF[:, :1], "k1")
    with pytest.raises(ValueError, match="mask"):
        kl_penalty(LOGP, REF, "k1", mask=torch.ones(1, 3))


# -------------------------------------------------------------------------------------- controllers


def test_fixed_controller_never_moves_and_round_trips():
    c = FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.value == 0.05
    d = FixedKLController(0.2)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-0.1)


def test_adaptive_controller_hand_values():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(6.6, n_steps=100)  # error 0.1: * (1 + 0.1 * 0.01)
    assert c.value == pytest.approx(0.1 * 1.001)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(60.0, n_steps=100)  # error 9 clipped to 0.2
    assert c.value == pytest.approx(0.1 * 1.002)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(0.0, n_steps=100)  # error -1 clipped to -0.2
    assert c.value == pytest.approx(0.1 * 0.998)
    c.update(6.0, n_steps=100)  # on target: no change
    assert c.value == pytest.approx(0.1 * 0.998)


def test_adaptive_controller_moves_towards_target():
    up = AdaptiveKLController(0.1, target=1.0, horizon=100)
    down = AdaptiveKLController(0.1, target=1.0, horizon=100)
    for _ in range(5):
        up.update(2.0, 10)
        down.update(0.5, 10)
    assert up.value > 0.1 > down.value


def test_adaptive_controller_state_dict_round_trips():
    a = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    for kl in (8.0, 9.0, 3.0):
        a.update(kl, 64)
    b = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value != 0.1
    a.update(7.0, 64)
    b.update(7.0, 64)
    assert b.value == a.value


def test_make_kl_controller():
    assert isinstance(make_kl_controller(0.05), FixedKLController)
    c = make_kl_controller(0.05, adaptive=True, target=6.0, horizon=10000)
    assert isinstance(c, AdaptiveKLController) and c.value == 0.05
    with pytest.raises(ValueError, match="target"):
        make_kl_controller(0.05, adaptive=True)
    with pytest.raises(ValueError, match="horizon"):
        make_kl_controller(0.05, adaptive=True, target=6.0, horizon=0)


# ---------------------------------------------------------------------------------- reward shaping


def test_shape_rewards_hand_values_and_masked_positions():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, NAN, 1e9]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = shape_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(out, torch.tensor([[-0.05, -0.1, 0.85], [1.75, 0.0, 0.0]]))


def test_shape_rewards_without_penalty_and_no_grad():
    scores = torch.tensor([1.0, -3.0], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -3.0]])
    torch.testing.assert_close(shape_rewards(scores, None, mask, 0.1), expected)
    out = shape_rewards(scores, torch.full((2, 3), NAN), mask, 0.0)  # coef 0: kl not read
    torch.testing.assert_close(out, expected)
    assert not out.requires_grad


def test_shape_rewards_rejects_empty_and_non_prefix_masks():
    with pytest.raises(ValueError, match="at least one kept token"):
        shape_rewards(torch.tensor([1.0, 2.0]), None, torch.tensor([[1, 1], [0, 0]]), 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        shape_rewards(torch.tensor([1.0]), None, torch.tensor([[0, 1]]), 0.0)
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(torch.tensor([1.0, 2.0]), None, torch.tensor([[1, 1]]), 0.0)


def test_response_lengths():
    assert response_lengths(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])).tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match="contiguous"):
        response_lengths(torch.tensor([[1, 0, 1]]))
