"""GKD's divergence on the teacher's top-k tokens (algorithms/gkd.py): hand-computed values for each beta,
exactness when the k tokens are the whole vocabulary, the lower bound when they are not, and gradients
that reach only the student."""

import math

import pytest
import torch

from rlhf_system.algorithms.gkd import generalized_jsd, logprobs_at, topk_jsd, topk_logprobs, with_rest

P = torch.tensor([0.5, 0.3, 0.2])   # teacher
Q = torch.tensor([0.2, 0.2, 0.6])   # student


def kl(p, q) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p.tolist(), q.tolist()))


def test_hand_values_for_each_beta():
    t, s = P.log(), Q.log()
    # beta 0: forward KL(teacher || student) = .5 ln 2.5 + .3 ln 1.5 + .2 ln(1/3) = 0.3600
    assert generalized_jsd(t, s, 0.0).item() == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(1.5)
                                                               + 0.2 * math.log(0.2 / 0.6), abs=1e-6)
    assert generalized_jsd(t, s, 0.0).item() == pytest.approx(0.36004, abs=1e-4)
    # beta 1: reverse KL(student || teacher) = .2 ln .4 + .2 ln(2/3) + .6 ln 3 = 0.3948
    assert generalized_jsd(t, s, 1.0).item() == pytest.approx(0.39482, abs=1e-4)
    # beta 0.5: m = (p + q) / 2 = [.35, .25, .4]; .5 KL(p||m) + .5 KL(q||m)
    m = (P + Q) / 2
    assert generalized_jsd(t, s, 0.5).item() == pytest.approx(0.5 * kl(P, m) + 0.5 * kl(Q, m), abs=1e-6)
    # beta 0.25: m = .25 p + .75 q
    m = 0.25 * P + 0.75 * Q
    assert generalized_jsd(t, s, 0.25).item() == pytest.approx(0.25 * kl(P, m) + 0.75 * kl(Q, m), abs=1e-6)
    assert generalized_jsd(t, t, 0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_the_rest_bucket_holds_the_mass_left():
    lp = torch.tensor([[math.log(0.5), math.log(0.3)]])
    out = with_rest(lp)
    torch.testing.assert_close(out.exp(), torch.tensor([[0.5, 0.3, 0.2]]))
    full = with_rest(torch.tensor([[0.0]]))  # all the mass in the kept token: the floor, not -inf
    assert torch.isfinite(full).all() and full[0, 1].exp().item() == pytest.approx(1e-12)


def test_top_k_of_the_whole_vocabulary_is_the_exact_divergence_and_fewer_a_lower_bound():
    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(2, 5, 11, generator=g) * 2
    student_logits = torch.randn(2, 5, 11, generator=g)
    for beta in (0.0, 0.5, 1.0):
        exact = generalized_jsd(teacher_logits.log_softmax(-1), student_logits.log_softmax(-1), beta)
        ids, t_lp = topk_logprobs(teacher_logits, 11)
        torch.testing.assert_close(topk_jsd(t_lp, logprobs_at(student_logits, ids), beta), exact, atol=1e-5, rtol=1e-5)
        for k in (1, 3, 7):
            ids, t_lp = topk_logprobs(teacher_logits, k)
            coarse = topk_jsd(t_lp, logprobs_at(student_logits, ids), beta)
            assert (coarse <= exact + 1e-5).all() and (coarse >= -1e-6).all(), (beta, k)


def test_top_k_ids_and_log_probs_at_a_temperature():
    logits = torch.tensor([[[2.0, 0.0, 1.0, -1.0]]])
    ids, lp = topk_logprobs(logits, 2, temperature=0.5)
    assert ids.tolist() == [[[0, 2]]]
    torch.testing.assert_close(lp, (logits / 0.5).log_softmax(-1)[..., [0, 2]])
    torch.testing.assert_close(logprobs_at(logits, ids, 0.5), lp)
    # chunking by positions changes nothing
    long = torch.randn(2, 9, 6)
    a, b = topk_logprobs(long, 3, chunk_size=4), topk_logprobs(long, 3)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="k must be"):
        topk_logprobs(logits, 5)


def test_gradients_reach_the_student_only_and_move_it_towards_the_teacher():
    teacher_logits = torch.tensor([[[3.0, 1.0, 0.0, -2.0, -2.0]]])
    student_logits = torch.zeros(1, 1, 5, requires_grad=True)
    ids, t_lp = topk_logprobs(teacher_logits, 2)
    t_lp.requires_grad_(True)
    loss = topk_jsd(t_lp, logprobs_at(student_logits, ids), 0.5).sum()
    loss.backward()
    assert t_lp.grad is None or torch.count_nonzero(t_lp.grad) == 0
    # descending the gradient raises the student's logit of the teacher's favourite token most
    assert student_logits.grad[0, 0].argmin().item() == 0
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(P.log(), Q.log(), 1.5)
