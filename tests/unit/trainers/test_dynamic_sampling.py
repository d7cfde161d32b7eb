"""DAPO dynamic sampling in the controller (trainers/ppo_samples.py): groups whose samples all score the same
are dropped, more prompts are sampled until the batch is full, and the round limit and the deadline end
the refilling with the batch completed from dropped groups, counted in the metrics.

The engine is a stand-in (vLLM's sampling is not what is tested: the refill logic is): prompt "mixed-*"
gets half right answers, "same-*" all wrong ones. The reward is a real rule, loaded through the registry.
"""

from types import SimpleNamespace

import pytest

from rlhf_system.config import load_config
from rlhf_system.data.samples import Generation
from rlhf_system.rewards.registry import RuleRewards
from rlhf_system.trainers.ppo_samples import ROUND_SEED, sample_and_score

N = 4


class Engine:
    def __init__(self):
        self.seeds = []

    def generate(self, prompt_ids, n=None, temperature=None, seed=None):
        self.seeds.append(seed)
        out = []
        for ids in prompt_ids:
            mixed = chr(ids[0]) == "m"
            for j in range(N):
                text = "right" if mixed and j % 2 == 0 else "wrong"
                out.append(Generation([ord(ch) for ch in text], [0.0] * len(text), "stop"))
        return out


class Chars:
    """Token id = character code: enough of a tokenizer for the rule to read the text."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def prompt(name):
    return {"prompt_ids": [ord(ch) for ch in name], "messages": [{"role": "user", "content": name}],
            "meta": {"answer": "right"}}


@pytest.fixture
def prep(tmp_path):
    rule = tmp_path / "rule.py"
    rule.write_text("def fn(prompt, response, meta):\n    return float(response == meta['answer'])\n")
    return SimpleNamespace(tokenizer=Chars(), rules=RuleRewards([f"{rule}:fn"]), remote=None, env=None, agent=None)


def config(*over):
    return load_config("configs/grpo/tiny-cpu.yaml", ["rewards.use_model=false", f"rollout.n_samples_per_prompt={N}",
                                                      "train.rollout_batch_size=2", "train.global_batch_size=8",
                                                      "train.micro_batch_size=8", *over])


def run(cfg, prep, first, refills):
    engine, timer = Engine(), {}
    queue = [[prompt(p) for p in batch] for batch in refills]
    got = sample_and_score(cfg, prep, {}, engine, [prompt(p) for p in first], 3, lambda: queue.pop(0), timer)
    names = ["".join(map(chr, p["prompt_ids"])) for p in got.prompts[::N]]
    return got, names, engine, timer


def test_refills_until_the_batch_holds_informative_groups(prep):
    cfg = config("rollout.dynamic_sampling=true")
    got, names, engine, timer = run(cfg, prep, ["mixed-0", "same-0"], [["same-1", "mixed-1"], ["mixed-2", "mixed-3"]])
    assert names == ["mixed-0", "mixed-1"]  # two rounds filled it; the third batch was never drawn
    assert len(got.samples) == 2 * N and got.scores.tolist() == [1.0, 0.0, 1.0, 0.0] * 2
    assert got.metrics["dynamic_sampling/rounds"] == 2
    assert got.metrics["dynamic_sampling/informative"] == 0.5  # 2 of the 4 groups generated
    assert got.metrics["dynamic_sampling/filled"] == 0
    assert got.metrics["reward/rules"] == 0.5
    base = cfg.rollout.seed + 7919 * 3
    assert engine.seeds == [base, base + ROUND_SEED]  # each round samples with its own seeds
    assert timer["time/generate"] >= 0 and timer["time/reward"] >= 0


def test_round_limit_completes_the_batch_with_dropped_groups(prep):
    cfg = config("rollout.dynamic_sampling=true", "rollout.dynamic_sampling_max_rounds=3")
    got, names, engine, _ = run(cfg, prep, ["same-0", "same-1"], [["same-2", "mixed-0"], ["same-3", "same-4"]])
    assert names == ["mixed-0", "same-0"]  # informative first, then dropped ones in the order drawn
    assert len(engine.seeds) == 3
    assert got.metrics["dynamic_sampling/filled"] == 1 and got.metrics["dynamic_sampling/rounds"] == 3
    assert got.metrics["dynamic_sampling/informative"] == pytest.approx(1 / 6)


def test_deadline_stops_refilling(prep):
    cfg = config("rollout.dynamic_sampling=true", "rollout.dynamic_sampling_timeout_s=1e-9")
    got, names, engine, _ = run(cfg, prep, ["same-0", "mixed-0"], [["mixed-1", "mixed-2"]])
    assert len(engine.seeds) == 1 and names == ["mixed-0", "same-0"]
    assert got.metrics["dynamic_sampling/filled"] == 1


def test_without_dynamic_sampling_one_round_keeps_every_group(prep):
    got, names, engine, _ = run(config(), prep, ["same-0", "mixed-0"], [])
    assert names == ["same-0", "mixed-0"] and len(engine.seeds) == 1
    assert not any(k.startswith("dynamic_sampling") for k in got.metrics)


def test_overlong_punishment_enters_the_score(prep):
    # "wrong" and "right" are 5 tokens; budget 6 with a buffer of 4: 5 tokens is 3 into the ramp -> -0.75
    got, _, _, _ = run(config("rollout.max_new_tokens=6", "rewards.overlong_buffer=4"), prep, ["mixed-0", "same-0"], [])
    assert got.metrics["reward/overlong"] == -0.75
    assert got.scores.tolist() == [0.25, -0.75, 0.25, -0.75] + [-0.75] * 4
