"""Learning is real for RL: PPO with a critic and GRPO, each with the rule verifier as reward and a fixed
seed, starting from the same SFT model, raise held-out accuracy by a clear margin.

The task is the tool-use family (tasks/tools.py): 3-digit arithmetic that the 3.5M-parameter
model cannot do in its head but can delegate to the calculator (rollout.env=tools: multi-turn episodes,
the tool's output masked out of the loss). The SFT model learned from demonstrations of which 30% guess
instead of calling the tool, as careless demonstrators would; RL against the verifier is what makes the
policy call it. Held-out questions were neither demonstrated nor RL prompts.

- PPO proper (configs/ppo/tiny-cpu.yaml: actor, critic with a fresh value head, reference, vLLM engine;
  GAE over the policy's tokens of each episode, KL in the reward), synchronous.
- GRPO with rollouts one step ahead of training (configs/grpo/tools-cpu.yaml, train.max_staleness=1).
- GRPO with an outside agent program (configs/grpo/agent-cpu.yaml): `openai` client code drives the
  episodes through the agent endpoint; the trained tokens are the engine's, exactly.
- On-policy distillation (configs/opd/tools-cpu.yaml): the SFT model learns from the GRPO policy's
  per-token log-probs on its own samples, with no reward, and moves most of the way to it; with partial
  rollouts (configs/opd/partial-cpu.yaml); and GKD (configs/opd/gkd-cpu.yaml): a top-k divergence on a mix
  of the student's samples and the data's responses.

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
    from rlhf_system.tasks.tools import write_tool_dataset

    root = tmp_path_factory.mktemp("rl_tools")
    data = root / "data"
    write_tool_dataset(data, seed=0, n_train=1000, n_test=100, demo_flaws=0.3)
    rlhf("make-tiny-model", str(root / "tiny"), "--tools")
    sft = root / "sft"
    rlhf(*train_args("sft", "configs/sft/tiny-cpu.yaml", root / "tiny" / "policy", sft, data / "tool_sft_train.jsonl",
                     data / "tool_sft_test.jsonl", "train.epochs=5"))
    return sft / "hf", data


@pytest.fixture(scope="module")
def grpo_tools(tool_sft, tmp_path_factory):
    """The shipped tool config (configs/grpo/tools-cpu.yaml) run on the SFT model; its exported policy is
    the teacher of the distillation test."""
    sft, data = tool_sft
    rl = tmp_path_factory.mktemp("grpo-tools")
    rlhf(*train_args("ppo", "configs/grpo/tools-cpu.yaml", sft, rl, data / "rl_tool_train.jsonl",
                     data / "rl_tool_test.jsonl", "placement.call_timeout_s=300"))
    return rl


def test_grpo_with_tools_and_async_rollouts_raises_held_out_accuracy(grpo_tools):
    """The shipped tool config (configs/grpo/tools-cpu.yaml): multi-turn episodes with the calculator, GRPO,
    rollouts one step ahead of training (train.max_staleness=1). Held-out questions (never demonstrated,
    never RL prompts): the policy calls the tool more often and answers right more often."""
    rl = grpo_tools
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


def distil(config: str, tool_sft, grpo_tools, run, *extra: str) -> tuple[list[float], list[dict]]:
    """`config` run with the SFT model as the student and the GRPO policy as the teacher: the held-out
    reverse KL to the teacher before and after, and the metrics rows."""
    sft, data = tool_sft
    rlhf(*train_args("ppo", config, sft, run, data / "rl_tool_train.jsonl", data / "rl_tool_test.jsonl",
                     f"model.reference_path={grpo_tools / 'hf'}", "checkpoint.export_hf=false",
                     "placement.call_timeout_s=300", *extra))
    result = json.loads((run / "result.json").read_text())
    kl = [result[k]["eval/rl_tool_test/sampled/distill/reverse_kl"] for k in ("initial", "final")]
    return kl, [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_distillation_closes_most_of_the_gap_to_its_teacher(tool_sft, grpo_tools, tmp_path):
    """The shipped distillation config (configs/opd/tools-cpu.yaml): the SFT model (student) samples tool
    episodes, the GRPO-trained policy of the test above (teacher, frozen in the reference role) scores the
    same tokens, and each student token's reward is minus its log-ratio to the teacher; the task reward is
    only logged. On held-out questions the student's reverse KL to the teacher falls, and its sampled
    behaviour moves most of the way to the teacher's. The teacher's figures are its run's final evaluation:
    same prompts, same seeds."""
    run = tmp_path / "opd"
    kl, rows = distil("configs/opd/tools-cpu.yaml", tool_sft, grpo_tools, run)
    student, teacher = figures_of(run), figures_of(grpo_tools)
    print(json.dumps({"held_out_reverse_kl": kl}))
    # Measured (deterministic, CPU fp32, AMD EPYC AVX2, 2026-12-06), these 10 steps: held-out reverse KL per
    # token 0.0214 -> 0.0025; sampled tool-call rate 0.74 -> 0.9025 (teacher 0.9225: 88% of the gap),
    # sampled exact 0.315 -> 0.37 (teacher 0.4225: 51%), pass@4 0.67 -> 0.70; greedy 0.79 -> 0.70 (teacher
    # 0.74; greedy is not what the loss matches). The bars are about half of those.
    assert kl[1] <= 0.4 * kl[0], kl

    def closed(key: str) -> float:
        before, after = student[key]
        return (after - before) / (teacher[key][1] - before)

    assert teacher["sampled/tool/call_rate"][1] > student["sampled/tool/call_rate"][0] + 0.1, teacher
    assert closed("sampled/tool/call_rate") >= 0.5, (student, teacher)
    assert closed("sampled/all/exact") >= 0.25, (student, teacher)
    train_kl = [r["distill/reverse_kl"] for r in rows if "distill/reverse_kl" in r]
    assert len(train_kl) == 10 and sum(train_kl[-3:]) < 0.5 * sum(train_kl[:3]), train_kl


def test_partial_rollouts_learn_and_lose_no_sample(tool_sft, grpo_tools, tmp_path):
    """The shipped partial-rollout config (configs/opd/partial-cpu.yaml): generation in 8-token slices, the
    groups unfinished when a step's batch is full continue under the next weights. The student still
    learns (held-out reverse KL to the teacher falls), long samples do span two policy versions, every
    prompt group is trained once (none lost, none twice), and no token is older than 2k versions."""
    run = tmp_path / "partial"
    kl, rows = distil("configs/opd/partial-cpu.yaml", tool_sft, grpo_tools, run, "logging.rollouts=true")
    steps = [r for r in rows if "partial/slices" in r]
    print(json.dumps({"held_out_reverse_kl": kl, "mixed": [r["partial/mixed_versions"] for r in steps],
                      "token_staleness": [r["partial/token_staleness"] for r in steps]}))
    assert kl[1] <= 0.6 * kl[0], kl
    assert len(steps) == 8 and sum(r["partial/mixed_versions"] > 0 for r in steps) >= 2, steps
    assert all(r["partial/token_staleness_max"] <= 2 for r in steps)
    dumped = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    groups = [tuple(d["prompt_ids"]) for d in dumped if d["row"] % 4 == 0]
    assert len(dumped) == 8 * 16 * 4 and len(set(groups)) == len(groups)  # each group once, n=4 samples
    for d in dumped:  # each token's version; a sample's tokens never go back to older weights
        assert len(d["versions"]) == len(d["response_ids"]) and d["versions"] == sorted(d["versions"])
        assert d["step"] - 1 - d["versions"][0] <= 2


def test_gkd_on_a_mix_of_student_samples_and_data_responses_closes_the_gap(tool_sft, grpo_tools, tmp_path):
    """The shipped GKD config (configs/opd/gkd-cpu.yaml): each step about half of the prompt groups are the
    student's samples and the rest the prompt record's reference response (the tool call), and every row
    trains on GKD's generalised JSD to the teacher on its top-16 tokens. The student's held-out reverse KL
    to the teacher falls, the loss falls, and the off-policy rows are exactly the data's tokens."""
    sft, data = tool_sft
    run = tmp_path / "gkd"
    kl, rows = distil("configs/opd/gkd-cpu.yaml", tool_sft, grpo_tools, run, "logging.rollouts=true")
    steps = [r for r in rows if "gkd/off_policy" in r]
    loss = [r["actor/gkd_loss"] for r in steps]
    print(json.dumps({"held_out_reverse_kl": kl, "gkd_loss": loss, "off_policy": [r["gkd/off_policy"] for r in steps]}))
    # Measured (deterministic, CPU fp32, AMD EPYC AVX2, 2026-12-06), these 8 steps: held-out reverse KL per
    # token 0.01036 -> 0.00172 (0.17x; partial-cpu.yaml's sampled reward with partial rollouts, same
    # student and teacher: 0.41x); GKD loss 0.0019 -> 0.0003; off-policy share 0.375-0.875 per step, 0.58 in all.
    assert kl[1] <= 0.4 * kl[0], kl
    assert len(steps) == 8 and sum(loss[-3:]) < 0.8 * sum(loss[:3]), loss
    share = sum(r["gkd/off_policy"] for r in steps) / len(steps)
    assert all(0 < r["gkd/off_policy"] < 1 for r in steps) and 0.3 < share < 0.7, steps
    dumped = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    calls = {}  # the reference responses: the tool call of each training prompt
    for line in (data / "rl_tool_train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        calls[rec["prompt"]] = rec["response"]
    off = [d for d in dumped if d["off_policy"]]
    assert len(dumped) == 8 * 16 * 4 and abs(len(off) / len(dumped) - share) < 1e-9
    assert {d["text"] for d in off} <= set(calls.values()) and len({d["text"] for d in off}) > 16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft)
    for d in off:  # the data's tokens, whole, through the end of the turn, and every one of them trained
        assert tok.decode(d["response_ids"], skip_special_tokens=True) == d["text"], d
        assert d["response_ids"][-1] == tok.eos_token_id and all(d["trained_mask"])


def traced_episodes(path) -> dict:
    """The agent's own record of its calls (AGENT_TRACE: each call's prompt and completion token ids, as the
    endpoint returned them), as {whole token sequence: (first prompt length, mask of the completions)}."""
    calls: dict = {}
    for line in path.read_text().splitlines():
        c = json.loads(line)
        calls.setdefault(c["key"], []).append(c)
    out = {}
    for cs in calls.values():
        first, full = len(cs[0]["prompt_token_ids"]), cs[-1]["prompt_token_ids"] + cs[-1]["token_ids"]
        mask = [0] * (len(full) - first)
        for c in cs:  # each call continued exactly what came before it
            assert full[:len(c["prompt_token_ids"]) + len(c["token_ids"])] == c["prompt_token_ids"] + c["token_ids"]
            start = len(c["prompt_token_ids"]) - first
            mask[start:start + len(c["token_ids"])] = [1] * len(c["token_ids"])
        out[tuple(full)] = (first, mask)
    return out


def test_an_openai_client_agent_drives_grpo_and_learns(tool_sft, tmp_path, monkeypatch):
    """configs/grpo/agent-cpu.yaml: examples/agents/calculator_agent.py, plain `openai` client code that runs
    the calculator itself, drives every episode through the OpenAI-compatible endpoint in front of the
    engines. The policy learns as with the built-in tool environment, and what the trainer trained on
    (logging.rollouts) is token for token what the engine returned to the agent, its completions and only
    those under the loss."""
    sft, data = tool_sft
    run, trace = tmp_path / "agent", tmp_path / "trace.jsonl"
    monkeypatch.setenv("AGENT_TRACE", str(trace))
    rlhf(*train_args("ppo", "configs/grpo/agent-cpu.yaml", sft, run, data / "rl_tool_train.jsonl",
                     data / "rl_tool_test.jsonl", "checkpoint.export_hf=false", "placement.call_timeout_s=300",
                     "logging.rollouts=true", "train.max_steps=6", "train.max_eval_samples=50"))
    result = json.loads((run / "result.json").read_text())
    before, after = result["initial"], result["final"]
    key = "eval/rl_tool_test/{}"
    figures = {k: [before[key.format(k)], after[key.format(k)]] for k in (
        "all/exact", "sampled/all/exact", "sampled/all/pass@4", "sampled/env/turns")}
    print(json.dumps(figures))
    # Measured (seeded per episode and call, so batching does not change it; CPU fp32, AMD EPYC AVX2,
    # 2026-12-06), these 6 steps: sampled exact 0.30 -> 0.375, calls per sampled episode 1.71 -> 1.825 (the
    # tool is called more), pass@4 0.70 -> 0.74, greedy 0.74 -> 0.72. The bars are about half.
    assert figures["sampled/all/exact"][1] >= figures["sampled/all/exact"][0] + 0.035, figures
    assert figures["sampled/env/turns"][1] >= figures["sampled/env/turns"][0] + 0.05, figures
    assert figures["all/exact"][1] >= figures["all/exact"][0] - 0.06, figures
    rows = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 128 and {r["step"] for r in rows} == set(range(1, 7))
    episodes = traced_episodes(trace)
    for r in rows:
        first, mask = episodes[tuple(r["prompt_ids"] + r["response_ids"])]
        assert first == len(r["prompt_ids"]) and mask == r["trained_mask"], r["row"]
    # most episodes are two completions around a tool result (the result's tokens are not trained)
    two_turns = [any(a == 0 and b == 1 for a, b in zip(m, m[1:])) for m in (r["trained_mask"] for r in rows)]
    assert sum(two_turns) > len(rows) // 2
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["agent/batch_size"] > 1 for m in metrics if "agent/batch_size" in m)
