"""The episode runner (trainers/episodes.py): token in, token out, masks, budgets, and environments that fail.

The engine is a scripted stand-in that records the token ids it is given (the runner is what is tested,
not vLLM's sampling); the tokenizer and its chat template are the tiny kit's, the environment is the real
`tools` one or a user file loaded through the registry. test_rl_tools.py runs the same path with vLLM.
"""

import pytest
import torch

from rlhf_system.config import ConfigError, load_config
from rlhf_system.data.experience import Experience
from rlhf_system.data.samples import Generation, Sample
from rlhf_system.data.tokenize import check_tool_template, render_observation, render_prompt
from rlhf_system.envs.base import EnvError
from rlhf_system.envs.tools import format_call
from rlhf_system.trainers.episodes import make_env_factory, run_episodes

N = 2
CALL = format_call("calculator", expression="123 * 456")


class Scripted:
    """Turn k of every episode answers `script[k]` (text + end-of-turn); log-probs -0.5 per token."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, []

    def generate(self, prompt_ids, n=None, temperature=None, seed=None):
        n = N if n is None else n
        self.calls.append({"prompts": [list(p) for p in prompt_ids], "n": n, "seed": seed, "temperature": temperature})
        text = self.script[len(self.calls) - 1]
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return [Generation(list(ids), [-0.5] * len(ids), "stop") for _ in range(len(prompt_ids) * n)]


def prompts(tok, k=2):
    rows = []
    for i in range(k):
        msgs = [{"role": "user", "content": f"What is 123 * 456? ({i})"}]
        ids = tok(render_prompt(tok, msgs, "chat"), add_special_tokens=False)["input_ids"]
        rows.append({"prompt_ids": ids, "messages": msgs, "meta": {"answer": "56088"}})
    return rows


def config(*over):
    return load_config("configs/grpo/tiny-cpu.yaml", [f"rollout.n_samples_per_prompt={N}", "rollout.max_new_tokens=40",
                                                      "train.rollout_batch_size=2", "train.global_batch_size=4",
                                                      "train.micro_batch_size=4", *over])


def test_one_turn_episodes_are_the_single_turn_rollout(bpe_tokenizer):
    tok = bpe_tokenizer
    plain_engine, env_engine = Scripted(tok, ["56088"]), Scripted(tok, ["56088"])
    plain, m0 = run_episodes(config(), tok, plain_engine, prompts(tok), seed=11)
    cfg = config("rollout.env=tools", "rollout.max_turns=1")
    multi, m1 = run_episodes(cfg, tok, env_engine, prompts(tok), seed=11, make_env=make_env_factory(cfg))
    assert plain_engine.calls == env_engine.calls  # the same engine call: prompts, n and seed
    assert m0 == {} and m1["env/turns"] == 1 and m1["tool/call_rate"] == 0
    for a, b in zip(plain, multi):
        assert a.action_mask is None and b.action_mask == [1] * len(b.response_ids)
        assert (a.response_ids, a.logprobs, a.finish_reason, a.text) == \
               (b.response_ids, b.logprobs, b.finish_reason, b.text)
    exps = [Experience.from_rollout([p["prompt_ids"] for p in prompts(tok) for _ in range(N)],
                                    [s.response_ids for s in out], tok.pad_token_id) for out in (plain, multi)]
    exps[1].action_mask = exps[1].pad_responses([s.action_mask for s in multi])
    assert torch.equal(exps[0].policy_mask, exps[1].policy_mask)


def test_tool_call_turn_then_answer_token_in_token_out(bpe_tokenizer):
    tok = bpe_tokenizer
    cfg = config("rollout.env=tools", "rollout.max_turns=3")
    engine = Scripted(tok, ["I will compute. " + CALL, "56088"])
    samples, metrics = run_episodes(cfg, tok, engine, prompts(tok), seed=5, make_env=make_env_factory(cfg))
    turn1 = tok("I will compute. " + CALL, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    obs = tok(render_observation(tok, [{"role": "tool", "content": "56088"}], "chat", "t"),
              add_special_tokens=False)["input_ids"]
    turn2 = tok("56088", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    first, second = engine.calls
    assert first["n"] == N and second["n"] == 1 and second["seed"] != first["seed"]
    for b, s in enumerate(samples):
        # the second turn was generated from exactly the first turn's tokens and the observation's
        assert second["prompts"][b] == prompts(tok)[b // N]["prompt_ids"] + turn1 + obs
        assert s.response_ids == turn1 + obs + turn2
        assert s.action_mask == [1] * len(turn1) + [0] * len(obs) + [1] * len(turn2)
        assert s.logprobs == [-0.5] * len(turn1) + [0.0] * len(obs) + [-0.5] * len(turn2)
        assert s.text == "56088" and s.turns == 2 and s.finish_reason == "stop"
    # the observation renders as the template's tool turn and ends with the next generation prompt
    assert tok.decode(obs) == "\n<|im_start|>tool\n56088<|im_end|>\n<|im_start|>assistant\n"
    assert metrics == {"env/turns": 2.0, "env/reward": 0.0, "env/errors": 0, "env/observation_tokens": len(obs),
                       "tool/call_rate": 1.0, "tool/calls": 1.0, "tool/success": 1.0, "tool/timeouts": 0}


def test_turn_and_episode_budgets_end_episodes(bpe_tokenizer):
    tok = bpe_tokenizer
    turn1 = len(tok("I will compute. " + CALL, add_special_tokens=False)["input_ids"]) + 1
    # room for the first turn but not for the observation and another turn
    cfg = config("rollout.env=tools", "rollout.max_turns=3", f"rollout.max_episode_tokens={turn1 + 5}")
    samples, _ = run_episodes(cfg, tok, Scripted(tok, ["I will compute. " + CALL]), prompts(tok), 5, make_env_factory(cfg))
    assert all(s.finish_reason == "length" and s.turns == 1 and len(s.response_ids) == turn1 for s in samples)
    # a turn longer than what is left is cut there
    cfg = config("rollout.env=tools", "rollout.max_turns=3", "rollout.max_episode_tokens=4")
    samples, _ = run_episodes(cfg, tok, Scripted(tok, ["I will compute. " + CALL]), prompts(tok), 5, make_env_factory(cfg))
    assert all(s.finish_reason == "length" and len(s.response_ids) == 4 for s in samples)
    # the last allowed turn still calling a tool ends the episode; its text is what gets scored
    cfg = config("rollout.env=tools", "rollout.max_turns=1", "rollout.max_episode_tokens=200")
    samples, m = run_episodes(cfg, tok, Scripted(tok, [CALL]), prompts(tok), 5, make_env_factory(cfg))
    assert all(s.turns == 1 and s.text == CALL for s in samples) and m["tool/calls"] == 1


ENV_FILE = """
import time
from rlhf_system.envs.base import Environment, Step

class Raises(Environment):
    def step(self, turn):
        raise RuntimeError("the game crashed")

class Hangs(Environment):
    def step(self, turn):
        time.sleep(30)

class Malformed(Environment):
    def step(self, turn):
        return Step(observation="not a message list")
"""


@pytest.mark.parametrize("name,why", [("Raises", "RuntimeError: the game crashed"),
                                      ("Hangs", "TimeoutError: no answer within rollout.env_timeout_s=0.5"),
                                      ("Malformed", "the observation must be a non-empty list of messages")])
def test_failing_environment_names_env_sample_and_turn_or_ends_the_episode(bpe_tokenizer, tmp_path, name, why):
    tok = bpe_tokenizer
    (tmp_path / "envs.py").write_text(ENV_FILE)
    spec = f"{tmp_path / 'envs.py'}:{name}"
    cfg = config(f"rollout.env={spec}", "rollout.max_turns=2", "rollout.env_timeout_s=0.5")
    with pytest.raises(EnvError, match=rf"environment '{spec}', sample 0 \(prompt 'What is 123 \* 456\? \(0\)'\), "
                                       rf"turn 1: {why}"):
        run_episodes(cfg, tok, Scripted(tok, ["hello"]), prompts(tok), 5, make_env_factory(cfg))
    cfg = config(f"rollout.env={spec}", "rollout.max_turns=2", "rollout.env_timeout_s=0.5", "rollout.env_errors=end_episode")
    samples, m = run_episodes(cfg, tok, Scripted(tok, ["hello"]), prompts(tok), 5, make_env_factory(cfg))
    assert m["env/errors"] == len(samples) == 2 * N and all(s.env_failed and s.turns == 1 for s in samples)


def test_failed_episode_scores_zero(bpe_tokenizer, tmp_path):
    from types import SimpleNamespace

    from rlhf_system.rewards.registry import RuleRewards
    from rlhf_system.trainers.ppo_samples import reward_parts

    samples = [Sample([0], [1], [0.0], "stop", "56088", env_reward=0.5, env_failed=failed) for failed in (False, True)]
    prep = SimpleNamespace(rules=RuleRewards(["synthetic_correct"]), remote=None)
    rows = [{"messages": [], "meta": {"answer": "56088", "task": "mul", "family": "arithmetic"}}] * 2
    parts = reward_parts(config("rollout.env=tools", "rewards.use_model=false"), prep, {}, rows, samples)
    assert parts["reward/rules"].tolist() == [1.0, 0.0] and parts["reward/env"].tolist() == [0.5, 0.0]


def test_chat_template_without_tool_support_is_a_config_error(bpe_tokenizer, tmp_path):
    check_tool_template(bpe_tokenizer, "chat", "tiny")  # ChatML renders tool turns
    tok = bpe_tokenizer.__class__.from_pretrained(_saved(bpe_tokenizer, tmp_path))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}")
    with pytest.raises(ConfigError, match="model m/x: its chat template drops tool-role messages"):
        check_tool_template(tok, "chat", "m/x")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                         "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match="model m/x: its chat template cannot render a tool message"):
        check_tool_template(tok, "chat", "m/x")


def _saved(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"
