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
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


def _cli(*args: str, timeout: int = 900) -> None:
    out = subprocess.run([sys.executable, "-m", "rlhf_system.cli", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]


def test_grpo_raises_held_out_reward_and_accuracy(kit_model, tmp_path):
    from rlhf_system.data.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, seed=0, n_train=2000, n_test=200, demo_flaws=0.3)
    sft = tmp_path / "sft"
    _cli("train", "sft", "--config", "configs/sft/tiny-cpu.yaml", f"model.path={kit_model['policy']}",
         f"run_dir={sft}", "logging.console=false", "train.epochs=5",
         f"data.train=[{{path: {data / 'sft_train.jsonl'}}}]", f"data.eval=[{{path: {data / 'sft_test_seen.jsonl'}}}]")
    rl = tmp_path / "grpo"
    _cli("train", "ppo", "--config", "configs/grpo/tiny-cpu.yaml", f"model.path={sft / 'hf'}", f"run_dir={rl}",
         "logging.console=false", "train.eval_every=0", "checkpoint.export_hf=false",
         f"data.train=[{{path: {data / 'rl_train.jsonl'}}}]", f"data.eval=[{{path: {data / 'rl_test_seen.jsonl'}}}]",
         "placement.call_timeout_s=300")
    result = json.loads((rl / "result.json").read_text())
    assert result["steps"] == 20
    before, after = result["initial"], result["final"]
    key = "eval/rl_test_seen/{}all/{}"
    figures = {f"{mode or 'greedy/'}{m}": [before[key.format(mode, m)], after[key.format(mode, m)]]
               for mode in ("", "sampled/") for m in ("reward", "exact")}
    print(json.dumps(figures))
    # Measured on this machine (deterministic: seeded vLLM sampling, CPU fp32): greedy reward 0.325 -> 0.415,
    # greedy exact 0.20 -> 0.29, sampled reward 0.23 -> 0.31, sampled exact 0.14 -> 0.175. The bars are
    # about half of those gains.
    # Greedy: what a user of the model sees.
    assert figures["greedy/reward"][1] >= figures["greedy/reward"][0] + 0.045, figures
    assert figures["greedy/exact"][1] >= figures["greedy/exact"][0] + 0.045, figures
    # Sampled: the policy's expected reward, the quantity RL maximises (4 seeded samples x 200 prompts).
    assert figures["sampled/reward"][1] >= figures["sampled/reward"][0] + 0.04, figures
    assert figures["sampled/exact"][1] > figures["sampled/exact"][0], figures
