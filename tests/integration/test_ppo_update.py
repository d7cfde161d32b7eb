"""The faster PPO paths compute what the plain ones did (CPU, fp32, real DeepSpeed in Ray workers):

- log-probs from the response positions only (`logits_to_keep`) equal those of full-sequence logits;
- skipping the old-log-prob forward (one optimiser step per rollout: the update's own forward,
  detached) gives the same update as feeding the old log-probs from a separate forward;
- length-grouped micro-batches, and two ranks, give the same update as one micro-batch on one rank
  (the loss is the token mean of the whole mini-batch, however it is split);
- so do token-budget micro-batches in the padding-free layout (train.max_tokens_per_micro_batch,
  train.padding_free): a different number of micro-batches per mini-batch, ranks agreeing on it,
  also for the critic under ZeRO-3 (where a rank running one forward more would hang the others).
"""

import pytest
import torch

from rlhf_system.data.experience import Experience
from tests.integration.conftest import ppo_config

ROWS = 16


def _experience(vocab: int, pad_id: int) -> Experience:
    """Rows of varied prompt and response lengths (so padding and grouping matter), random tokens."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(ROWS)]
    responses = [torch.randint(3, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(ROWS)]
    exp = Experience.from_rollout(prompts, responses, pad_id)
    signs = torch.randint(0, 2, (ROWS, 1), generator=g).float() * 2 - 1
    return exp.with_fields(advantages=signs * exp.response_mask)


def test_response_positions_only_give_the_full_logits_log_probs(small_model):
    from transformers import AutoModelForCausalLM

    from rlhf_system.workers.sequences import policy_forward

    model = AutoModelForCausalLM.from_pretrained(small_model["policy"], dtype=torch.float32).eval()
    exp = _experience(model.config.vocab_size, 0)
    with torch.no_grad():
        fast, _ = policy_forward(model, exp, temperature=0.7)
        logits = model(input_ids=exp.sequences, attention_mask=exp.attention_mask).logits / 0.7
    full = torch.log_softmax(logits, -1)
    for b in range(ROWS):
        P, R = int(exp.prompt_lens[b]), int(exp.response_lens[b])
        want = full[b, P - 1:P - 1 + R].gather(-1, exp.sequences[b, P:P + R, None]).squeeze(-1)
        torch.testing.assert_close(fast[b, :R], want, rtol=0, atol=1e-5)


def _update(small_model, synthetic_dir, tmp_path, exp, *, ranks=1, micro=ROWS, feed_old=False, sampler_gap=0.0,
            **over):
    from rlhf_system.placement.roles import start_roles, stop_roles
    from rlhf_system.workers.actor import ActorWorker

    # Adam with eps=1 steps by about lr * g for these small gradients: an update linear in the gradient, so
    # float-summation differences stay small (Adam's sign-like first step would flip near-zero entries).
    # One thread per worker: the runs differ only in the split.
    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, placement__actor=ranks, optim__lr=0.5,
                     optim__eps=1.0, placement__threads_per_worker=1,
                     train__rollout_batch_size=ROWS // 2, train__global_batch_size=ROWS,
                     train__micro_batch_size=micro, rollout__temperature=1.0, **{"algorithm__estimator": "rloo", **over})
    groups, shared = start_roles(cfg, {"actor": ActorWorker})
    try:
        actor = groups["actor"]
        actor.call("setup", cfg, 10)
        if feed_old:
            exp = exp.with_fields(old_logprobs=actor.call_sharded("logprobs", exp))
        if sampler_gap:  # the engine's log-probs: the trainer's moved by up to +-sampler_gap (seeded)
            g = torch.Generator().manual_seed(2)
            noise = (torch.rand(exp.old_logprobs.shape, generator=g) * 2 - 1) * sampler_gap
            exp = exp.with_fields(rollout_logprobs=(exp.old_logprobs + noise) * exp.response_mask)
        actor.call_sharded("update", exp, 0, 0.0)
        return actor.call("full_state_dict")[0]
    finally:
        stop_roles(groups, shared)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def plain(ray_cluster, small_model, synthetic_dir, tmp_path_factory):
    """The plain path: old log-probs from their own forward, one micro-batch, one rank."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(small_model["policy"]).vocab_size
    exp = _experience(vocab, 0)
    path = tmp_path_factory.mktemp("plain")
    from transformers import AutoModelForCausalLM

    initial = {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(small_model["policy"]).named_parameters()}
    return exp, _update(small_model, synthetic_dir, path, exp, feed_old=True), initial


def test_skipping_the_old_logprob_forward_gives_the_same_update(plain, small_model, synthetic_dir, tmp_path):
    exp, want, initial = plain
    assert _max_diff(want, initial) > 1e-3, "the update did not move the weights: the test proves nothing"
    got = _update(small_model, synthetic_dir, tmp_path, exp, feed_old=False)
    assert _max_diff(got, want) < 1e-6


TOKEN_BUDGET = {"train__max_tokens_per_micro_batch": 60, "train__padding_free": True}


@pytest.mark.parametrize("ranks,micro,over", [(1, 4, {}), (2, 4, {}), (2, 4, TOKEN_BUDGET)],
                         ids=["grouped-micro-batches", "two-ranks", "token-budget-padding-free-two-ranks"])
def test_grouped_micro_batches_and_ranks_give_the_same_update(plain, small_model, synthetic_dir, tmp_path,
                                                              ranks, micro, over):
    exp, want, _ = plain
    got = _update(small_model, synthetic_dir, tmp_path, exp, ranks=ranks, micro=micro, feed_old=True, **over)
    assert _max_diff(got, want) < 1e-5


def _critic_update(small_model, synthetic_dir, tmp_path, exp, *, ranks: int, zero: int, **over):
    """Values before, and the critic's weights after, one value update (the trained reward model as the
    critic: no freshly initialised head, so the runs start from the same weights)."""
    from rlhf_system.placement.roles import start_roles, stop_roles
    from rlhf_system.workers.critic import CriticWorker

    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, placement__critic=ranks,
                     deepspeed__zero_stage=zero, model__critic_path=str(small_model["reward"]), optim__critic_lr=0.5,
                     optim__eps=1.0, placement__threads_per_worker=1, algorithm__estimator="gae",
                     train__rollout_batch_size=ROWS // 2, train__global_batch_size=ROWS,
                     train__micro_batch_size=ROWS // 2, rollout__temperature=1.0, **over)
    groups, shared = start_roles(cfg, {"critic": CriticWorker})
    try:
        critic = groups["critic"]
        critic.call("setup", cfg, 10)
        values = critic.call_sharded("values", exp)
        g = torch.Generator().manual_seed(3)
        returns = torch.randn(values.shape, generator=g) * exp.response_mask
        critic.call_sharded("update", exp.with_fields(values=values, returns=returns), 0)
        return values, critic.call("full_state_dict")[0]
    finally:
        stop_roles(groups, shared)


def test_critic_under_zero3_on_two_ranks_matches_zero2_on_one(plain, small_model, synthetic_dir, tmp_path):
    """ZeRO-3 on two ranks with token-budget micro-batches in the padding-free layout (the rows' tokens differ
    per rank, so their micro-batch counts would too without the agreement) vs the padded fixed split."""
    from rlhf_system.algorithms.balance import token_micro_batches

    exp = plain[0]
    tokens = (exp.prompt_lens + exp.response_lens).tolist()
    half, budget = ROWS // 2, TOKEN_BUDGET["train__max_tokens_per_micro_batch"]
    alone = [len(token_micro_batches(tokens[:half], budget)), len(token_micro_batches(tokens[half:], budget))]
    assert alone[0] != alone[1], f"each rank would need as many micro-batches alone {alone}: nothing to agree"
    v2, w2 = _critic_update(small_model, synthetic_dir, tmp_path / "z2", exp, ranks=1, zero=2)
    v3, w3 = _critic_update(small_model, synthetic_dir, tmp_path / "z3", exp, ranks=2, zero=3, **TOKEN_BUDGET)
    from transformers import AutoModelForSequenceClassification

    initial = {k: v.float() for k, v in AutoModelForSequenceClassification.from_pretrained(
        small_model["reward"]).named_parameters()}
    assert _max_diff(w2, initial) > 1e-3, "the update did not move the critic: the test proves nothing"
    torch.testing.assert_close(v3, v2, rtol=0, atol=1e-5)
    assert w3.keys() == w2.keys()
    assert _max_diff(w3, w2) < 1e-5


# The GRPO-family losses and aggregations, each on a batch whose responses have masked stretches (as
# tool output inside a multi-turn response has): split over micro-batches and ranks, the update is still
# the one of the whole batch at once. dr_grpo's seq_sum_norm weighs rows, not tokens, across splits.
VARIANTS = {
    "gspo": {"algorithm__policy_loss": "gspo", "algorithm__loss_agg": "seq", "algorithm__clip_eps": 3e-4,
             "algorithm__clip_eps_high": 4e-4},
    # CISPO's loss with Dr. GRPO's aggregation (rows, not tokens, weigh across splits) and masked IS
    "cispo-dr_grpo-masked-is": {"algorithm__policy_loss": "cispo", "algorithm__clip_eps": 1.0,
                                "algorithm__clip_eps_high": 0.28, "algorithm__estimator": "dr_grpo",
                                "algorithm__loss_agg": "seq_sum_norm", "algorithm_kl__in_reward": False,
                                "algorithm_kl__estimator": "k3", "algorithm__is_mode": "mask",
                                "algorithm__tis_cap": 2.0, "sampler_gap": 1.0},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_grpo_family_updates_do_not_depend_on_the_split(plain, small_model, synthetic_dir, tmp_path, variant):
    exp, _, initial = plain
    # every third response token is "environment output": not the policy's, left out of the loss
    action = (torch.arange(exp.T)[None, :] % 3 != 1).float().expand(len(exp), exp.T).contiguous()
    exp = exp.with_fields(action_mask=action)
    whole = _update(small_model, synthetic_dir, tmp_path / "whole", exp, feed_old=True, **VARIANTS[variant])
    assert _max_diff(whole, initial) > 1e-3, "the update did not move the weights: the test proves nothing"
    split = _update(small_model, synthetic_dir, tmp_path / "split", exp, ranks=2, micro=4, feed_old=True,
                    **VARIANTS[variant])
    assert _max_diff(split, whole) < 1e-5
