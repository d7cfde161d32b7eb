"""Partial rollouts (trainers/partial.py) with a stand-in engine whose next token is a function of the
context alone (as greedy decoding is): slicing must not change a single token, each token must carry
the version and log-prob of the weights that made it, no prompt group may be lost or duplicated, the
staleness bound must restart old groups, and the pool must survive a checkpoint exactly."""

import json

import pytest

from rlhf_system.config import ConfigError, load_config
from rlhf_system.data.samples import Generation
from rlhf_system.trainers.partial import PartialRollouts

N, B, EOS, BUDGET, SLICE = 2, 3, 0, 24, 5


class Engine:
    """Token t+1 = f(context); the response of prompt p (its first id) ends after length(p, j) tokens.
    Log-probs encode the weights' version, so the test can see which version made each token."""

    def __init__(self):
        self.version, self.calls, self.limits = 0, [], set()

    @staticmethod
    def full(prompt: list[int]) -> list[int]:
        """The whole response an unsliced call would give: long for some prompts (past the budget)."""
        length = {0: 3, 1: 30, 2: 12}[prompt[0] % 3] + len(prompt) % 2
        out = []
        while len(out) < length:
            out.append(1 + (sum(prompt) * 7 + 3 * sum(out) + len(out)) % 50)
        return out + [EOS]

    def generate(self, prompt_ids, n=1, seeds=None, max_new_tokens=None, temperature=None):
        assert n == 1 and len(seeds) == len(prompt_ids) and len(set(seeds)) == len(seeds)
        self.calls.append(len(prompt_ids))
        self.limits.add(max_new_tokens)
        out = []
        for ids in prompt_ids:
            prompt = ids[:ids.index(-1) + 1]              # the prompt ends with a -1 marker
            done = ids[len(prompt):]
            rest = self.full(prompt)[len(done):]
            assert self.full(prompt)[:len(done)] == done  # a continuation gets exactly its own tokens back
            got = rest[:max_new_tokens]
            out.append(Generation(got, [-0.1 * (self.version + 1)] * len(got),
                                  "stop" if got and got[-1] == EOS else "length"))
        return out


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class Prompts:
    def __init__(self):
        self.drawn = 0

    def __call__(self):
        rows = [{"prompt_ids": [self.drawn + i, 5, -1], "messages": [], "meta": {"k": self.drawn + i}} for i in range(B)]
        self.drawn += B
        return rows


def config(*over):
    return load_config("configs/grpo/tiny-cpu.yaml", [
        f"rollout.n_samples_per_prompt={N}", f"rollout.max_new_tokens={BUDGET}", f"rollout.partial_tokens={SLICE}",
        f"train.rollout_batch_size={B}", "train.global_batch_size=6", "train.micro_batch_size=6",
        "train.max_staleness=1", "rewards.use_model=false", *over])


def steps(partial, engine, prompts, versions):
    out = []
    for v in versions:
        engine.version = v
        out.append(partial.produce(engine, prompts, v))
    return out


def test_slices_are_token_exact_and_each_token_records_its_version():
    engine, prompts = Engine(), Prompts()
    partial = PartialRollouts(config("train.max_staleness=3"), Tok())
    batches = steps(partial, engine, prompts, range(6))
    mixed = 0
    for step, (rows, samples, metrics) in enumerate(batches):
        assert len(samples) == len(rows) == N * B and metrics["partial/slices"] >= 1
        for row, s in zip(rows, samples):
            full = Engine.full(row["prompt_ids"])
            assert s.prompt_ids == row["prompt_ids"]
            assert s.response_ids == full[:BUDGET]  # sliced, resumed under other weights: the same tokens
            assert s.finish_reason == ("stop" if len(full) <= BUDGET else "length")
            assert s.versions == sorted(s.versions) and max(s.versions) <= step
            assert s.logprobs == [pytest.approx(-0.1 * (v + 1)) for v in s.versions]
            assert s.text == " ".join(map(str, s.response_ids))
            mixed += len(set(s.versions)) > 1
    assert mixed > 0  # long samples went on across updates
    assert engine.limits == {SLICE}  # every engine call is one slice


def test_every_group_leaves_the_pool_once_in_order_of_finishing():
    engine, prompts = Engine(), Prompts()
    partial = PartialRollouts(config("train.max_staleness=3"), Tok())
    batches = steps(partial, engine, prompts, range(8))
    taken = [r["meta"]["k"] for rows, _, _ in batches for r in rows[::N]]
    in_pool = [g.row["meta"]["k"] for g in partial.pool]
    assert len(taken) == len(set(taken)) == 8 * B  # none twice
    assert sorted(taken + in_pool) == list(range(prompts.drawn))  # none lost
    assert len(partial.pool) == partial.cfg.rollout.partial_pool * B - B  # topped up by one batch per step
    for rows, _, _ in batches:  # a group leaves whole: its n samples side by side
        assert all(rows[i] == rows[i + 1] for i in range(0, len(rows), N))


def test_groups_older_than_the_staleness_bound_restart():
    engine, prompts = Engine(), Prompts()
    partial = PartialRollouts(config("train.max_staleness=1"), Tok())
    batches = steps(partial, engine, prompts, [0, 1, 3, 4, 6])  # versions may jump (drop mode, a slow run)
    assert sum(m["partial/restarted"] for _, _, m in batches) > 0
    for (_, samples, _), v in zip(batches, [0, 1, 3, 4, 6]):
        assert all(min(s.versions) >= v - 1 for s in samples)  # no token from before the bound
        assert all(s.response_ids == Engine.full(s.prompt_ids)[:BUDGET] for s in samples)


def test_the_pool_survives_a_checkpoint_exactly():
    engine, prompts = Engine(), Prompts()
    straight = PartialRollouts(config(), Tok())
    first = steps(straight, engine, prompts, range(3))
    state = json.loads(json.dumps(straight.state_dict()))
    drawn = prompts.drawn
    rest = steps(straight, engine, prompts, range(3, 6))
    resumed, prompts2 = PartialRollouts(config(), Tok()), Prompts()
    resumed.load_state_dict(state)
    prompts2.drawn = drawn
    again = steps(resumed, Engine(), prompts2, range(3, 6))
    assert [(r, s) for r, s, _ in again] == [(r, s) for r, s, _ in rest] and first


@pytest.mark.parametrize("over, message", [
    (["train.max_staleness=0"], "Fix: train.max_staleness=1"),
    (["train.stale_batches=drop"], "train.stale_batches=drop"),
    ([f"rollout.partial_tokens={BUDGET}"], "not below rollout.max_new_tokens"),
    (["rollout.env=tools", "rollout.max_turns=2"], "rollout.env='tools' is not supported"),
    (["rollout.dynamic_sampling=true"], "rollout.dynamic_sampling=True is not supported"),
    (["rollout.stop=['</a>']"], "could be missed across a slice boundary"),
])
def test_what_partial_rollouts_cannot_be_combined_with_is_a_config_error(over, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config(*over)
