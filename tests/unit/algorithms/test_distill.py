"""On-policy distillation (algorithm.estimator=opd): the per-token advantages against hand values, the
dispatcher's composition with the task reward, the config's rules, and the property the estimator
exists for: its exact expected policy gradient is the negative gradient of KL(student || teacher)."""

import pytest
import torch

from rlhf_system.algorithms.advantages import (
    compute_advantages,
    expand_to_tokens,
    grpo_advantages,
    opd_advantages,
)
from rlhf_system.config import ConfigError, load_config
from rlhf_system.config_checks import roles_for
from tests.unit.test_config import PPO, write

NAN = float("nan")

# student log-probs of the sampled tokens, the teacher's of the same tokens; row 1 is 2 tokens long
STUDENT = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, NAN]])
TEACHER = torch.tensor([[-1.5, -1.0, -0.5], [-0.7, -1.0, NAN]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# log-ratio s - t: [[0.5, -1.0, 0.0], [0.5, -2.0, -]]


def test_each_token_gets_minus_its_own_log_ratio():
    adv = opd_advantages(STUDENT - TEACHER, MASK)
    torch.testing.assert_close(adv, torch.tensor([[-0.5, 1.0, 0.0], [-0.5, 2.0, 0.0]]))
    torch.testing.assert_close(opd_advantages(STUDENT - TEACHER, MASK, coef=2.0),
                               torch.tensor([[-1.0, 2.0, 0.0], [-1.0, 4.0, 0.0]]))


def test_discount_sums_the_later_tokens():
    # discount 1: A_t = sum_{s>=t} r_s; row 0: r = [-0.5, 1, 0] -> [0.5, 1, 0]; row 1: [-0.5, 2] -> [1.5, 2]
    torch.testing.assert_close(opd_advantages(STUDENT - TEACHER, MASK, discount=1.0),
                               torch.tensor([[0.5, 1.0, 0.0], [1.5, 2.0, 0.0]]))
    # discount 0.5: row 0: A_2 = 0, A_1 = 1, A_0 = -0.5 + 0.5 * 1 = 0
    torch.testing.assert_close(opd_advantages(STUDENT - TEACHER, MASK, discount=0.5)[0], torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="discount"):
        opd_advantages(STUDENT - TEACHER, MASK, discount=1.5)


def test_dispatcher_adds_the_reward_advantage_only_when_asked():
    kl = STUDENT - TEACHER
    scores = torch.tensor([1.0, 0.0])
    adv, returns = compute_advantages("opd", scores=scores, mask=MASK, kl=kl, kl_coef=0.0, group_size=2)
    assert returns is None
    torch.testing.assert_close(adv, opd_advantages(kl, MASK))  # kl_coef is not consulted; no whitening
    mixed, _ = compute_advantages("opd", scores=scores, mask=MASK, kl=kl, group_size=2, distill_coef=0.5,
                                  distill_reward_coef=0.25)
    want = opd_advantages(kl, MASK, 0.5) + 0.25 * expand_to_tokens(grpo_advantages(scores, 2), MASK)
    torch.testing.assert_close(mixed, want)
    with pytest.raises(ValueError, match="teacher"):
        compute_advantages("opd", scores=scores, mask=MASK)


def test_expected_gradient_is_minus_the_reverse_kl_gradient():
    """One token over a 6-way vocabulary, every outcome enumerated: sum_a p(a) A(a) grad log p(a) with the
    opd advantage equals -grad KL(p || q) (the score function's mean is 0, so no baseline is needed)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(logits, -1)
    adv = opd_advantages((logp - teacher).detach()[None], torch.ones(1, 6))[0].double()
    surrogate = (logp.exp().detach() * adv * logp).sum()
    (pg,) = torch.autograd.grad(surrogate, logits, retain_graph=True)
    kl = (logp.exp() * (logp - teacher)).sum()
    (kl_grad,) = torch.autograd.grad(kl, logits)
    torch.testing.assert_close(pg, -kl_grad, rtol=0, atol=1e-12)
    assert kl.item() > 0.05  # the distributions differ, so the check is not 0 == 0


def test_config_rules(tmp_path):
    teacher = ["algorithm.estimator=opd", "model.reference_path=teacher", "algorithm.kl.coef=0"]
    cfg = load_config(write(tmp_path, PPO), teacher)
    assert "reference" in roles_for(cfg) and "critic" not in roles_for(cfg)
    with pytest.raises(ConfigError, match="model.reference_path, but it is empty"):
        load_config(write(tmp_path, PPO), ["algorithm.estimator=opd", "algorithm.kl.coef=0"])
    with pytest.raises(ConfigError, match="would count it twice"):
        load_config(write(tmp_path, PPO), ["algorithm.estimator=opd", "model.reference_path=teacher"])
    with pytest.raises(ConfigError, match="needs a group of samples"):
        load_config(write(tmp_path, PPO), teacher + ["algorithm.distill.reward_coef=1", "rollout.n_samples_per_prompt=1",
                                                     "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="algorithm.estimator"):
        load_config(write(tmp_path, PPO), ["algorithm.estimator=distill"])


def test_config_choices_are_the_registries():
    from rlhf_system.algorithms.names import POLICY_LOSSES
    from rlhf_system.workers.actor import POLICY_LOSSES as LOSS_FUNCTIONS

    assert tuple(LOSS_FUNCTIONS) == POLICY_LOSSES


def test_teacher_must_read_text_as_the_student_does(tmp_path, char_tokenizer, bpe_tokenizer):
    from rlhf_system.trainers.preflight import check_teacher_tokenizer

    for name, tok in (("student", bpe_tokenizer), ("same", bpe_tokenizer), ("other", char_tokenizer)):
        tok.save_pretrained(tmp_path / name)
    over = ["algorithm.estimator=opd", "algorithm.kl.coef=0", f"model.path={tmp_path / 'student'}"]
    check_teacher_tokenizer(load_config(write(tmp_path, PPO), over + [f"model.reference_path={tmp_path / 'same'}"]))
    with pytest.raises(ConfigError, match=r"teacher's tokenizer differs from the student's in \d+ tokens"):
        check_teacher_tokenizer(load_config(write(tmp_path, PPO), over + [f"model.reference_path={tmp_path / 'other'}"]))
