"""The OpenAI-compatible agent endpoint (agents/): real HTTP, the `openai` client package, a real tokenizer
and chat template; the engines are a stand-in that records what it was asked (the endpoint is under test,
not vLLM). What must hold: the tokens of a sample are exactly the engine's completions and the rendered
new messages, in order; auth, budgets, history rewrites and failures are one-line errors; concurrent
episodes are batched into one engine call."""

import sys
import threading
import time

import openai
import pytest
from openai import OpenAI

from rlhf_system.agents.runner import AgentError, AgentRunner, load_agent
from rlhf_system.agents.session import Session
from rlhf_system.config import RunConfig
from rlhf_system.data.samples import Generation
from rlhf_system.data.tokenize import render_observation, render_prompt

PROGRAMS = "tests.unit.agents.programs"


class Engines:
    """generate() as RolloutGroup's: each completion is the prompt's last 3 ids reversed, then eos;
    log-prob -0.25 per token. Records every call's prompts, seeds and limits."""

    def __init__(self, eos: int, fail: bool = False):
        self.eos, self.fail, self.calls = eos, fail, []
        self.lock = threading.Lock()

    def generate(self, prompt_ids, n=None, temperature=None, seed=None, max_new_tokens=None, seeds=None):
        with self.lock:
            self.calls.append({"prompts": [list(p) for p in prompt_ids], "seeds": seeds, "limit": max_new_tokens,
                               "temperature": temperature})
        if self.fail:
            raise RuntimeError("engine 0 died")
        out = []
        for p in prompt_ids:
            ids = (p[-3:][::-1] + [self.eos])[:max_new_tokens]
            out.append(Generation(ids, [-0.25] * len(ids), "stop" if ids[-1] == self.eos else "length"))
        return out


def config(agent: str, **rollout) -> RunConfig:
    cfg = RunConfig(mode="ppo")
    cfg.rollout.agent = agent
    cfg.rollout.max_turns = rollout.pop("max_turns", 2)
    cfg.rollout.max_new_tokens = 16
    cfg.rollout.n_samples_per_prompt = rollout.pop("n", 1)
    cfg.rollout.agent_batch_wait_ms = rollout.pop("wait_ms", 20.0)
    for k, v in rollout.items():
        setattr(cfg.rollout, k, v)
    return cfg


ROW = {"messages": [{"role": "user", "content": "Add the two numbers."}], "meta": {"reward": 0.5},
       "prompt_ids": [1, 2, 3]}


def test_samples_are_the_engines_tokens_and_the_rendered_new_messages(bpe_tokenizer):
    tok = bpe_tokenizer
    engines = Engines(tok.eos_token_id)
    runner = AgentRunner(config(f"{PROGRAMS}:two_calls"), tok)
    try:
        samples, metrics = runner.run(engines, [ROW], seed=100)
    finally:
        runner.close()
    (s,) = samples
    prompt = tok(render_prompt(tok, ROW["messages"], "auto"), add_special_tokens=False)["input_ids"]
    first = prompt[-3:][::-1] + [tok.eos_token_id]
    text = tok.decode(first, skip_special_tokens=True)
    obs = tok(render_observation(tok, [{"role": "user", "content": "and again"}], "auto", "t"),
              add_special_tokens=False)["input_ids"]
    context = prompt + first + obs
    second = context[-3:][::-1] + [tok.eos_token_id]
    assert s.prompt_ids == prompt
    assert s.response_ids == first + obs + second
    assert s.action_mask == [1] * len(first) + [0] * len(obs) + [1] * len(second)
    assert s.logprobs == [-0.25] * len(first) + [0.0] * len(obs) + [-0.25] * len(second)
    assert s.env_reward == 0.5 and s.turns == 2 and not s.env_failed
    assert s.text == tok.decode(second, skip_special_tokens=True) and text
    # the engine continued exactly those ids, each call with its own seed, at the run's temperature
    assert [c["prompts"] for c in engines.calls] == [[prompt], [context]]
    assert [c["seeds"] for c in engines.calls] == [[100], [100 + 7_368_787]]
    # the agent's max_tokens, then what is left of the episode's 2 x 16 tokens after the first turn
    assert [c["limit"] for c in engines.calls] == [8, min(16, 32 - len(first) - len(obs))]
    assert engines.calls[0]["temperature"] == 1.0
    assert metrics["env/turns"] == 2


def test_refusals_are_one_line_openai_errors(bpe_tokenizer):
    tok = bpe_tokenizer
    runner = AgentRunner(config(f"{PROGRAMS}:no_call", max_turns=1, max_episode_tokens=5), tok)
    runner._start(Engines(tok.eos_token_id))
    ep = runner.endpoint
    key = ep.open(Session(tok, "auto", 64, 5, 1, 16), None)
    client = OpenAI(base_url=ep.base_url, api_key=key, max_retries=0)
    msgs = ROW["messages"]
    try:
        with pytest.raises(openai.AuthenticationError, match="unknown or missing API key"):
            OpenAI(base_url=ep.base_url, api_key="rlhf-guess", max_retries=0).chat.completions.create(
                model="p", messages=msgs)
        with pytest.raises(openai.BadRequestError, match="stream=true is not supported"):
            client.chat.completions.create(model="p", messages=msgs, stream=True)
        with pytest.raises(openai.BadRequestError, match="n must be 1"):
            client.chat.completions.create(model="p", messages=msgs, n=2)
        got = client.chat.completions.create(model="p", messages=msgs)
        assert got.choices[0].message.content is not None and got.usage.completion_tokens == 4
        assert got.model_extra["prompt_token_ids"][-1] == got.choices[0].model_extra["token_ids"][0]
        with pytest.raises(openai.ConflictError, match=r"made its 1 calls \(rollout.max_turns\)"):
            client.chat.completions.create(model="p", messages=msgs + [
                {"role": "assistant", "content": got.choices[0].message.content}, {"role": "user", "content": "x"}])
        assert client.models.list().data[0].id
        ep.close_session(key)
        with pytest.raises(openai.APIStatusError, match="this episode is over") as e:
            client.chat.completions.create(model="p", messages=msgs)
        assert e.value.status_code == 410
    finally:
        runner.close()


def test_history_rewrites_and_mixed_kinds_are_refused(bpe_tokenizer):
    tok = bpe_tokenizer
    runner = AgentRunner(config(f"{PROGRAMS}:no_call", max_turns=4), tok)
    runner._start(Engines(tok.eos_token_id))
    ep = runner.endpoint
    client = OpenAI(base_url=ep.base_url, api_key=ep.open(Session(tok, "auto", 64, 64, 4, 16), None), max_retries=0)
    try:
        first = client.chat.completions.create(model="p", messages=ROW["messages"]).choices[0].message.content
        with pytest.raises(openai.BadRequestError, match=r"messages\[1\] differs from the episode's conversation"):
            client.chat.completions.create(model="p", messages=ROW["messages"] + [
                {"role": "assistant", "content": first + " (edited)"}, {"role": "user", "content": "go on"}])
        with pytest.raises(openai.BadRequestError, match="no new message after the last assistant turn"):
            client.chat.completions.create(model="p", messages=ROW["messages"] + [
                {"role": "assistant", "content": first}])
        with pytest.raises(openai.BadRequestError, match="cannot mix in text ones"):
            client.completions.create(model="p", prompt="hello")
    finally:
        runner.close()


def test_concurrent_episodes_share_one_engine_call(bpe_tokenizer):
    tok = bpe_tokenizer
    engines = Engines(tok.eos_token_id)
    rows = [{**ROW, "messages": [{"role": "user", "content": f"Add {i} and {i}."}]} for i in range(4)]
    runner = AgentRunner(config(f"{PROGRAMS}:two_calls", n=2, wait_ms=2000), tok)
    try:
        samples, _ = runner.run(engines, rows, seed=0)
    finally:
        runner.close()
    # 8 episodes: every request waits for the others (all running episodes are waiting), so each round of
    # calls is one engine call of 8 prompts, not 8 calls
    assert [len(c["prompts"]) for c in engines.calls] == [8, 8]
    assert sorted(c for call in engines.calls for c in call["seeds"]) == sorted(
        [b for b in range(8)] + [b + 7_368_787 for b in range(8)])
    assert [s.turns for s in samples] == [2] * 8


def test_failures_name_the_episode_or_end_it(bpe_tokenizer):
    tok = bpe_tokenizer
    for program, message in (("raises", "ValueError: the agent's own bug"), ("no_call", "made no call")):
        runner = AgentRunner(config(f"{PROGRAMS}:{program}"), tok)
        try:
            with pytest.raises(AgentError, match=rf"episode 0 \(prompt 0, sample 0\): .*{message}"):
                runner.run(Engines(tok.eos_token_id), [ROW], seed=0)
        finally:
            runner.close()
    runner = AgentRunner(config(f"{PROGRAMS}:raises", env_errors="end_episode"), tok)
    try:
        samples, metrics = runner.run(Engines(tok.eos_token_id), [ROW], seed=0)
        assert samples[0].env_failed and metrics["env/errors"] == 1
    finally:
        runner.close()
    runner = AgentRunner(config(f"{PROGRAMS}:two_calls"), tok)  # a dead engine is the run's error
    try:
        with pytest.raises(RuntimeError, match="engine 0 died"):
            runner.run(Engines(tok.eos_token_id, fail=True), [ROW], seed=0)
    finally:
        runner.close()


def test_an_agent_past_its_deadline_is_cut_off(bpe_tokenizer, tmp_path):
    tok = bpe_tokenizer
    slow = tmp_path / "slow.py"
    slow.write_text("import time\n\ndef run(base_url, api_key, messages, meta):\n    time.sleep(30)\n")
    runner = AgentRunner(config(f"{slow}:run", agent_timeout_s=0.5), tok)
    t = time.monotonic()
    try:
        with pytest.raises(AgentError, match="ran past rollout.agent_timeout_s=0.5"):
            runner.run(Engines(tok.eos_token_id), [ROW], seed=0)
    finally:
        runner.close()
    assert time.monotonic() - t < 10


def test_a_command_agent_uses_the_environment_and_prints_its_reward(bpe_tokenizer):
    tok = bpe_tokenizer
    runner = AgentRunner(config(f"cmd:{sys.executable} -m {PROGRAMS}", max_turns=1), tok)
    try:
        samples, _ = runner.run(Engines(tok.eos_token_id), [ROW], seed=0)
    finally:
        runner.close()
    prompt = tok(ROW["messages"][0]["content"], add_special_tokens=False)["input_ids"]  # raw text, no template
    (s,) = samples
    assert s.prompt_ids == prompt and s.response_ids == prompt[-3:][::-1] + [tok.eos_token_id]
    assert s.env_reward == len(s.text)


@pytest.mark.parametrize("spec, message", [
    ("nope", "expected 'path/to/file.py:fn'"), ("missing.py:fn", "agent file missing.py not found"),
    ("json:nothing_here", "AttributeError"), ("cmd:", "names no command")])
def test_bad_agent_specs_fail_before_anything_starts(spec, message):
    with pytest.raises(AgentError, match=message):
        load_agent(spec)


def test_an_agent_stopped_by_the_budget_ends_its_episode(bpe_tokenizer):
    """two_calls raises on its second call (over max_turns=1 here): the episode ends after its first call."""
    tok = bpe_tokenizer
    runner = AgentRunner(config(f"{PROGRAMS}:two_calls", max_turns=1), tok)
    try:
        samples, _ = runner.run(Engines(tok.eos_token_id), [ROW], seed=0)
    finally:
        runner.close()
    (s,) = samples
    assert s.turns == 1 and not s.env_failed and s.action_mask == [1] * 4  # the follow-up is not kept
