"""The padding-free RL forward (train.padding_free, workers/sequences.py) equals the padded one in fp32:
the actor's log-probs and entropies, the critic's values, and their gradients, on rows of mixed prompt
and response lengths (an empty response among them)."""

import pytest
import torch

from rlhf_system.data.experience import Experience
from rlhf_system.workers.sequences import Flat, policy_forward, policy_topk, value_forward


class Bare:
    """What the forwards use of a DeepSpeed engine: its device, its module, and calling it."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def batch(pad: int) -> Experience:
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 9), (12, 3), (3, 0), (7, 14), (9, 1)]
    prompts = [torch.randint(3, 300, (p,), generator=g).tolist() for p, _ in shapes]
    responses = [torch.randint(3, 300, (r,), generator=g).tolist() for _, r in shapes]
    return Experience.from_rollout(prompts, responses, pad)


@pytest.fixture(scope="module")
def models(bpe_tokenizer):
    from rlhf_system.models.tiny import TinySpec, build_models

    spec = TinySpec(hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2, intermediate_size=256)
    policy, critic = build_models(bpe_tokenizer, spec)
    return policy.float(), critic.float(), bpe_tokenizer.pad_token_id


def test_flat_layout_positions():
    exp = Experience.from_rollout([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], pad_id=0)
    f = Flat(exp)
    assert f.input_ids.tolist() == [[1, 2, 3, 6, 7, 4, 5, 8, 9, 10]]
    assert f.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    # response token j of row b is predicted by the position before it
    assert f.at.tolist() == [2, 3, 6, 7, 8]
    assert f.scatter(torch.arange(5.0)).tolist() == [[0, 1, 0], [2, 3, 4]]


def test_policy_logprobs_entropy_and_gradients_match(models):
    policy, _, pad = models
    exp = batch(pad)
    engine = Bare(policy)
    got = {}
    for flat in (False, True):
        policy.zero_grad()
        lp, ent = policy_forward(engine, exp, temperature=0.7, with_entropy=True, flat=flat)
        ((lp * exp.response_mask).sum() + (ent * exp.response_mask).sum()).backward()
        got[flat] = (lp.detach(), ent.detach(), [p.grad.clone() for p in policy.parameters()])
    (lp0, ent0, g0), (lp1, ent1, g1) = got[False], got[True]
    mask = exp.response_mask.bool()
    assert lp0.shape == lp1.shape and (lp1[~mask] == 0).all()
    torch.testing.assert_close(lp1[mask], lp0[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent1[mask], ent0[mask], atol=1e-5, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_critic_values_match(models):
    _, critic, pad = models
    exp = batch(pad)
    with torch.no_grad():
        padded = value_forward(Bare(critic), exp)
        flat = value_forward(Bare(critic), exp, flat=True)
    mask = exp.response_mask.bool()
    torch.testing.assert_close(flat[mask], padded[mask], atol=1e-5, rtol=1e-5)


def test_gkd_teacher_and_student_sides_match_in_both_layouts(models):
    """The teacher's top-k (policy_topk) and the student's log-probs of those tokens (policy_forward's
    at_ids) are the same in both layouts, and are what the whole log-softmax at each position gives."""
    from rlhf_system.algorithms.gkd import topk_jsd

    policy, _, pad = models
    exp, engine, mask = batch(pad), Bare(policy), batch(pad).response_mask.bool()
    with torch.no_grad():
        full = policy(input_ids=exp.sequences, attention_mask=exp.attention_mask).logits / 0.7
        want = full.log_softmax(-1).gather(1, exp.gather_index[..., None].expand(-1, -1, full.shape[-1]))
    got = {}
    for flat in (False, True):
        with torch.no_grad():
            lp, ids, lps = policy_topk(engine, exp, 5, temperature=0.7, flat=flat)
        policy.zero_grad()
        lp2, _, at = policy_forward(engine, exp, temperature=0.7, flat=flat, at_ids=ids)
        jsd = topk_jsd(lps, at, 0.5)
        (jsd * exp.response_mask).sum().backward()
        got[flat] = (lp, ids, lps, at.detach(), [p.grad.clone() for p in policy.parameters()])
        torch.testing.assert_close(lp[mask], lp2.detach()[mask], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lps[mask], want.topk(5, -1).values[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(at[mask].detach(), want.gather(-1, ids)[mask], atol=1e-5, rtol=1e-5)
    (lp0, ids0, lps0, at0, g0), (lp1, ids1, lps1, at1, g1) = got[False], got[True]
    assert torch.equal(ids0[mask], ids1[mask])
    for a, b in ((lp0, lp1), (lps0, lps1), (at0, at1)):
        torch.testing.assert_close(b[mask], a[mask], atol=1e-5, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
