"""Learning is real for RL: PPO with a critic and GRPO, each with the rule verifier as reward and a fixed
seed, starting from the same SFT model, raise held-out accuracy by a clear margin.

The task is the tool-use family (data/synthetic_tools.py): 3-digit arithmetic that the 3.5M-parameter
model cannot do in its head but can delegate to the calculator (rollout.env=tools: multi-turn episodes,
the tool's output masked out of the loss). The SFT model learned from demonstrations of which 30% guess
instead of calling the tool, as careless demonstrators would; RL against the verifier is what makes the
policy call it. Held-out questions were neither demonstrated nor RL prompts.

- PPO proper (configs/ppo/tiny-cpu.yaml: actor, critic with a fresh value head, reference, vLLM engine;
  GAE over the policy's tokens of each episode, KL in the reward), synchronous.
- GRPO with rollouts one step ahead of training (configs/grpo/tools-cpu.yaml, train.max_staleness=1).

(The single-turn synthetic tasks' RL gains are shown by the demo: docs/demo.md, "What to read from it".)"""

import json

import pytest

from tests.integration.conftest import rlhf, train_args

pytestmark = pytest.mark.integration


def figures_of(run) -> dict:
    result = json.loads((run / "result.json").read_text())
    before, after = result["initial"], result["final"]
    key = "eval/rl_tool_test/{}"
    figures = {k: [before[key.format(k)], after[key.format(k)]] for k in (
        "all/exact", "sampled/all/exact", "sampled/all/pass@4", "sampled/tool/call_rate", "sampled/tool/success",
        "tool/call_rate")}
    print(json.dumps(figures))
    return {**figures, "steps": result["steps"]}


def assert_learned(figures: dict, gain: float) -> None:
    # the policy's expected accuracy (sampled, what RL maximises) and how often it calls the tool
    assert figures["sampled/all/exact"][1] >= figures["sampled/all/exact"][0] + gain, figures
    assert figures["sampled/tool/call_rate"][1] >= figures["sampled/tool/call_rate"][0] + 0.12, figures
    assert figures["all/exact"][1] >= figures["all/exact"][0] - 0.06, figures  # greedy: not made worse
    assert figures["sampled/tool/success"][1] > 0.8, figures


@pytest.fixture(scope="module")
def tool_sft(tmp_path_factory):
    """A tool-aware tiny model (its tokenizer knows tool calls and splits digits) after SFT on tool-use
    demonstrations, 30% of which guess the number instead of calling the calculator."""
    from rlhf_system.data.synthetic_tools import write_tool_dataset

    root = tmp_path_factory.mktemp("rl_tools")
    data = root / "data"
    write_tool_dataset(data, seed=0, n_train=1000, n_test=100, demo_flaws=0.3)
    rlhf("make-tiny-model", str(root / "tiny"), "--tools")
    sft = root / "sft"
    rlhf(*train_args("sft", "configs/sft/tiny-cpu.yaml", root / "tiny" / "policy", sft, data / "tool_sft_train.jsonl",
                     data / "tool_sft_test.jsonl", "train.epochs=5"))
    return sft / "hf", data


def test_grpo_with_tools_and_async_rollouts_raises_held_out_accuracy(tool_sft, tmp_path):
    """The shipped tool config (configs/grpo/tools-cpu.yaml): multi-turn episodes with the calculator, GRPO,
    rollouts one step ahead of training (train.max_staleness=1). Held-out questions (never demonstrated,
    never RL prompts): the policy calls the tool more often and answers right more often."""
    sft, data = tool_sft
    rl = tmp_path / "grpo-tools"
    rlhf(*train_args("ppo", "configs/grpo/tools-cpu.yaml", sft, rl, data / "rl_tool_train.jsonl",
                     data / "rl_tool_test.jsonl", "checkpoint.export_hf=false", "placement.call_timeout_s=300"))
    figures = figures_of(rl)
    assert figures["steps"] == 10
    # Measured (seeded vLLM sampling, CPU fp32, AMD EPYC AVX2, 2026-12-05), these 10 steps: sampled exact
    # 0.315 -> 0.4225, sampled tool-call rate 0.74 -> 0.9225, pass@4 0.67 -> 0.77, greedy exact 0.79 -> 0.74
    # (greedy decoding already calls the tool every time). At the config's earlier lr 1e-4: sampled 0.315
    # -> 0.3725 and greedy 0.79 -> 0.62 here (0.75 -> 0.79 on an Intel host): the lr was halved. The bars
    # are about half of the sampled gains.
    assert_learned(figures, 0.05)
    # one step off-policy, never more; generation of the next batch ran inside the train phase
    rows = [json.loads(x) for x in (rl / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "async/staleness" in r]
    assert [r["async/staleness"] for r in steps] == [0] + [1] * (len(steps) - 1)
    assert sum(r["time/generate_overlap"] > 0 for r in steps) >= len(steps) // 2
    assert all(r["env/observation_tokens"] > 0 and 0 <= r["tool/call_rate"] <= 1 for r in steps)


def test_gae_ppo_with_a_critic_raises_held_out_accuracy(tool_sft, tmp_path):
    """PPO proper on the tool task: the shipped PPO config with a critic, GAE over the policy's tokens of
    each multi-turn episode (the tool's tokens are not time steps), synchronous rollouts."""
    sft, data = tool_sft
    rl = tmp_path / "ppo"
    rlhf(*train_args("ppo", "configs/ppo/tiny-cpu.yaml", sft, rl, data / "rl_tool_train.jsonl",
                     data / "rl_tool_test.jsonl", "train.eval_every=0", "checkpoint.export_hf=false",
                     "placement.call_timeout_s=300", "rewards.use_model=false", "rewards.rules=[synthetic]",
                     "model.reward_path=''", "rollout.env=tools", "rollout.max_turns=2", "rollout.max_new_tokens=40",
                     "data.max_len=192", "train.max_eval_samples=100", "train.max_steps=10",
                     "optim.lr=5e-5", "optim.critic_lr=5e-5"))
    figures = figures_of(rl)
    assert figures["steps"] == 10
    # Measured (deterministic, as above), these 10 steps: sampled exact 0.315 -> 0.435, sampled tool-call
    # rate 0.74 -> 0.9075, pass@4 0.67 -> 0.81, greedy exact 0.79 -> 0.75. At the config's lr 1e-4 (tuned for
    # the demo's single-turn tasks): sampled 0.315 -> 0.43, greedy 0.79 -> 0.72. The bars are about half
    # of the sampled gains.
    assert_learned(figures, 0.05)
    rows = [json.loads(x) for x in (rl / "metrics.jsonl").read_text().splitlines()]
    assert all(r["async/staleness"] == 0 and r["critic/loss"] > 0 for r in rows if "async/staleness" in r)
