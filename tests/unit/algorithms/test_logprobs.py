"""algorithms/logprobs.py against hand-computed values.

The running example: logits [0, ln 2, ln 3] give softmax [1/6, 2/6, 3/6].
"""

import math

import pytest
import torch

from rlhf_system.algorithms.logprobs import (
    entropy_from_logits,
    masked_mean,
    masked_sum,
    shifted_logprobs,
    token_logprobs,
)

ROW = [0.0, math.log(2), math.log(3)]
LOG_SIXTH, LOG_THIRD, LOG_HALF = -1.791759469, -1.098612289, -0.693147181


def rows(n: int, shift: float = 0.0) -> torch.Tensor:
    """(1, n, 3) logits, every position [0, ln 2, ln 3] + shift."""
    return (torch.tensor(ROW) + shift).expand(1, n, 3).clone()


def test_token_logprobs_hand_values():
    out = token_logprobs(rows(3), torch.tensor([[0, 1, 2]]))
    assert out.shape == (1, 3)
    torch.testing.assert_close(out, torch.tensor([[LOG_SIXTH, LOG_THIRD, LOG_HALF]]))


def test_token_logprobs_is_shift_invariant_and_stable():
    # softmax ignores a constant added to every logit; exp(100) overflows float32 (max ~ e^88.7).
    # The tolerance covers float32 rounding of 100 + ln 2 itself (ulp at 100 is 7.6e-6).
    out = token_logprobs(rows(3, shift=100.0), torch.tensor([[0, 1, 2]]))
    torch.testing.assert_close(out, torch.tensor([[LOG_SIXTH, LOG_THIRD, LOG_HALF]]), atol=2e-5, rtol=0)


def test_token_logprobs_temperature():
    # T = 0.5 doubles the logits: exp gives [1, 4, 9], probs [1/14, 4/14, 9/14].
    out = token_logprobs(rows(3), torch.tensor([[0, 1, 2]]), temperature=0.5)
    torch.testing.assert_close(out, torch.tensor([[-2.639057330, -1.252762968, -0.441832752]]))


def test_token_logprobs_bf16_gives_float32():
    out = token_logprobs(rows(3).to(torch.bfloat16), torch.tensor([[0, 1, 2]]))
    assert out.dtype == torch.float32
    # ln 2 and ln 3 themselves are rounded to bf16 (8-bit mantissa), hence the loose tolerance.
    torch.testing.assert_close(out, torch.tensor([[LOG_SIXTH, LOG_THIRD, LOG_HALF]]), atol=1e-2, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1024])
def test_token_logprobs_chunking_does_not_change_result(chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    whole = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, labels, chunk_size=chunk_size), whole)


def test_token_logprobs_gradient_is_softmax_minus_onehot():
    logits = rows(1).requires_grad_()
    token_logprobs(logits, torch.tensor([[1]])).sum().backward()
    # d log p_1 / dz = onehot(1) - softmax = [-1/6, 1 - 1/3, -1/2]
    torch.testing.assert_close(logits.grad, torch.tensor([[[-1 / 6, 2 / 3, -1 / 2]]]))


def test_token_logprobs_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(rows(3), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(rows(3), torch.tensor([[0, 1, 2]]), temperature=0.0)


def test_token_logprobs_empty():
    assert token_logprobs(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)


def test_shifted_logprobs_aligns_position_t_with_token_t_plus_1():
    logits = rows(3)
    logits[0, 2] = float("nan")  # the last position predicts nothing, so it must be unused
    out = shifted_logprobs(logits, torch.tensor([[1, 2, 0]]))
    assert out.shape == (1, 2)
    # position 0 predicts token 2 (p = 1/2), position 1 predicts token 0 (p = 1/6)
    torch.testing.assert_close(out, torch.tensor([[LOG_HALF, LOG_SIXTH]]))


def test_entropy_hand_values():
    logits = torch.stack([torch.tensor(ROW), torch.zeros(3)])[None]  # (1, 2, 3)
    # H([1/6, 1/3, 1/2]) = (ln 6)/6 + (ln 3)/3 + (ln 2)/2; uniform over 3 gives ln 3.
    out = entropy_from_logits(logits)
    torch.testing.assert_close(out, torch.tensor([[1.011404265, 1.098612289]]))
    assert entropy_from_logits(logits.to(torch.bfloat16)).dtype == torch.float32


X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 0, 1], [0, 0, 1]])


def test_masked_sum_and_mean():
    assert masked_sum(X, M).item() == 10.0
    assert masked_mean(X, M).item() == pytest.approx(10 / 3)
    torch.testing.assert_close(masked_sum(X, M, dim=-1), torch.tensor([4.0, 6.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=-1), torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=0), torch.tensor([1.0, 0.0, 4.5]))  # empty column -> 0


def test_masked_mean_all_zero_mask_is_zero_with_zero_gradient():
    x = X.clone().requires_grad_()
    out = masked_mean(x, torch.zeros_like(M))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(X))


def test_masked_positions_cannot_leak_inf_or_nan():
    x = torch.tensor([[1.0, float("-inf"), float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 0, 0]])
    out = masked_mean(x, mask)
    assert out.item() == 1.0
    out.backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0, 0.0]]))


def test_mask_shape_must_match():
    with pytest.raises(ValueError, match="mask"):
        masked_sum(X, M[0])
