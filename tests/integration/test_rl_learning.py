"""Learning is real for RL: the shipped GRPO config (`rlhf train ppo --config configs/grpo/tiny-cpu.yaml`,
rule verifier as reward, fixed seed) starting from an SFT model raises held-out mean reward and
exact-match accuracy by a clear margin.

The SFT model learns from imperfect demonstrations (data/synthetic.py `demo_flaws`: 30% of them hedge,
drop the requested layout, over-refuse or comply with a flagged request), as SFT on human
demonstrations does; RL against the verifier is what removes those behaviours. Held-out prompts
(rl_test_seen) never occur in RL training. The same experiment on the demo's data (4000 SFT rows, 5
epochs; 20 GRPO steps) moved held-out sampled reward 0.26 -> 0.38 and greedy reward 0.37 -> 0.44; on
clean demonstrations the same run gained under 0.02 (RL sharpens or removes behaviours; it does not
teach this 3.5M-parameter model new arithmetic facts in 20 steps)."""

import json

import pytest

from tests.integration.conftest import rlhf, train_args

pytestmark = pytest.mark.integration


def test_grpo_raises_held_out_reward_and_accuracy(kit_model, tmp_path):
    from rlhf_system.data.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, seed=0, n_train=2000, n_test=200, demo_flaws=0.3)
    sft = tmp_path / "sft"
    rlhf(*train_args("sft", "configs/sft/tiny-cpu.yaml", kit_model["policy"], sft, data / "sft_train.jsonl",
                     data / "sft_test_seen.jsonl", "train.epochs=5"))
    rl = tmp_path / "grpo"
    rlhf(*train_args("ppo", "configs/grpo/tiny-cpu.yaml", sft / "hf", rl, data / "rl_train.jsonl",
                     data / "rl_test_seen.jsonl", "train.eval_every=0", "checkpoint.export_hf=false",
                     "placement.call_timeout_s=300"))
    result = json.loads((rl / "result.json").read_text())
    assert result["steps"] == 20
    before, after = result["initial"], result["final"]
    key = "eval/rl_test_seen/{}all/{}"
    figures = {f"{mode or 'greedy/'}{m}": [before[key.format(mode, m)], after[key.format(mode, m)]]
               for mode in ("", "sampled/") for m in ("reward", "exact")}
    print(json.dumps(figures))
    # Measured on this machine (deterministic: seeded vLLM sampling, CPU fp32): greedy reward 0.325 -> 0.41
    # (0.415 before the old-log-prob forward was skipped and trainers got every core), greedy exact 0.20 -> 0.29,
    # sampled reward 0.23 -> 0.32, sampled exact 0.14 -> 0.175. The bars are
    # about half of those gains.
    # Greedy: what a user of the model sees.
    assert figures["greedy/reward"][1] >= figures["greedy/reward"][0] + 0.045, figures
    assert figures["greedy/exact"][1] >= figures["greedy/exact"][0] + 0.045, figures
    # Sampled: the policy's expected reward, the quantity RL maximises (4 seeded samples x 200 prompts).
    assert figures["sampled/reward"][1] >= figures["sampled/reward"][0] + 0.04, figures
    assert figures["sampled/exact"][1] > figures["sampled/exact"][0], figures
