"""algorithms/packing.py: estimators over the policy's tokens of a multi-turn response, skipping the
environment's tokens, and the identity on a one-turn response."""

import torch

from rlhf_system.algorithms.advantages import compute_advantages
from rlhf_system.algorithms.packing import pack, unpack


def test_pack_moves_kept_values_to_the_front_and_unpack_puts_them_back():
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    x = torch.arange(18.0).view(3, 6)
    packed, packed_mask = pack(x, mask)
    assert packed.tolist() == [[0, 1, 4, 5], [6, 7, 8, 0], [0, 0, 0, 0]]
    assert packed_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert unpack(packed, mask).tolist() == (x * mask).tolist()


def test_contiguous_mask_is_the_identity():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    x = torch.randn(2, 4)
    packed, packed_mask = pack(x, mask)
    assert torch.equal(packed, (x * mask)[:, :3]) and torch.equal(packed_mask, mask[:, :3])
    assert torch.equal(unpack(packed, mask), x * mask)


def test_gae_over_a_multi_turn_response_discounts_policy_steps_only():
    # row: policy tokens at 0, 1, then two tool tokens, then policy tokens at 4, 5. Reward 1 at the end,
    # gamma 0.5, values 0, lam 1: the advantage of policy step j of 4 is 0.5 ** (3 - j), whatever the
    # tool tokens in between (they are not time steps), and 0 on the tool tokens.
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 1]])
    values = torch.zeros(1, 6)
    packed_mask = pack(mask, mask)[1]
    adv, returns = compute_advantages("gae", scores=torch.tensor([1.0]), mask=packed_mask,
                                      values=pack(values, mask)[0], gamma=0.5, lam=1.0, whiten_advantages=False)
    assert unpack(adv, mask).tolist() == [[0.125, 0.25, 0.0, 0.0, 0.5, 1.0]]
    assert unpack(returns, mask).tolist() == [[0.125, 0.25, 0.0, 0.0, 0.5, 1.0]]
