"""Agent episodes: an outside agent program drives each episode through the OpenAI-compatible endpoint
(endpoint.py), and its calls become token-exact samples for training (session.py).

    runner = AgentRunner(cfg, tokenizer)            # in prepare: a bad rollout.agent fails here
    samples, metrics = runner.run(rollout, prompts, seed, n, temperature)
    runner.close()

rollout.agent names the program:
- "path/to/file.py:fn" or "package.module:fn": called in a thread per episode as
  `fn(base_url, api_key, messages, meta) -> float | None`; `messages` and `meta` are the prompt row's.
  Any OpenAI client works: `OpenAI(base_url=base_url, api_key=api_key).chat.completions.create(...)`.
- "cmd:COMMAND": the command runs per episode (shell syntax, no shell) with OPENAI_BASE_URL and
  OPENAI_API_KEY set and {"messages": [...], "meta": {...}} on its standard input; the last line it
  prints is its reward (a number, {"reward": x} or null).

A returned number is the episode's reward (as an environment's, `reward/agent`); None leaves the scoring
to rewards.* on the last completion. An agent that stops because the endpoint refused a call over the
episode's budget (rollout.max_turns calls, rollout.max_episode_tokens tokens) ends its episode there, as
an environment's ends. Every episode runs under rollout.agent_timeout_s; then its key stops
working (410), and an agent that raised, exited non-zero, timed out or made no call fails the run naming
the episode (rollout.env_errors=fail) or scores 0 (end_episode). The samples are trainers/episodes.py's.
"""

from __future__ import annotations

import importlib
import json
import shlex
import subprocess
import threading
import time
from collections import Counter

from rlhf_system.agents.endpoint import Batcher, Endpoint
from rlhf_system.agents.session import Session
from rlhf_system.envs.base import EnvError
from rlhf_system.envs.metrics import episode_metrics


class AgentError(EnvError):
    """An agent program failed, or rollout.agent cannot name one."""


def load_agent(spec: str):
    """The callable rollout.agent names; AgentError (one line) when it cannot."""
    from rlhf_system.plugins import load_from_file

    spec = spec.strip()
    if spec.startswith("cmd:"):
        argv = shlex.split(spec[4:])
        if not argv:
            raise AgentError("rollout.agent='cmd:' names no command")
        return lambda base_url, api_key, messages, meta, timeout_s=None: command_agent(
            argv, base_url, api_key, messages, meta, timeout_s)
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise AgentError(f"rollout.agent={spec!r}: expected 'path/to/file.py:fn', 'package.module:fn' or 'cmd:COMMAND'")
    if target.endswith(".py"):
        return load_from_file(spec, "agent", AgentError)
    try:
        fn = getattr(importlib.import_module(target), name)
    except (ImportError, AttributeError) as e:
        raise AgentError(f"rollout.agent={spec!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise AgentError(f"rollout.agent={spec!r}: {name!r} is a {type(fn).__name__}, not callable")
    return fn


def command_agent(argv: list[str], base_url: str, api_key: str, messages: list, meta: dict,
                  timeout_s: float | None) -> float | None:
    import os

    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": api_key}
    try:
        proc = subprocess.run(argv, input=json.dumps({"messages": messages, "meta": meta}), capture_output=True,
                              text=True, env=env, timeout=timeout_s, stdin=None)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"agent command {argv[0]} ran past {timeout_s:g} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        raise AgentError(f"agent command {argv[0]} exited {proc.returncode}: {tail}")
    lines = [x for x in proc.stdout.strip().splitlines() if x.strip()]
    if not lines:
        return None
    try:
        got = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise AgentError(f"agent command {argv[0]}: its last line {lines[-1][:60]!r} is not JSON (a reward, "
                         "{\"reward\": x} or null)") from None
    return got.get("reward") if isinstance(got, dict) else got


def _reward(got, where: str) -> float | None:
    if got is None:
        return None
    if isinstance(got, bool) or not isinstance(got, (int, float)) or got != got:
        raise AgentError(f"{where}: the agent returned {got!r}; it must return a number (the reward) or None")
    return float(got)


class AgentRunner:
    def __init__(self, cfg, tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.fn = load_agent(cfg.rollout.agent)
        self.endpoint: Endpoint | None = None
        self.batcher: Batcher | None = None

    def _start(self, rollout) -> None:
        r = self.cfg.rollout
        if self.endpoint is None:
            self.batcher = Batcher(rollout, r.agent_batch_wait_ms / 1000)
            self.endpoint = Endpoint(self.batcher, r.agent_host, self.cfg.placement.call_timeout_s,
                                     self.cfg.name or "policy")

    def run(self, rollout, prompts: list[dict], seed: int | None, n: int | None = None,
            temperature: float | None = None) -> tuple[list[dict], dict]:
        """Samples in prompt-major order (prompt i's n episodes are rows i*n .. i*n+n-1) and their metrics."""
        r, d = self.cfg.rollout, self.cfg.data
        n = r.n_samples_per_prompt if n is None else n
        temperature = r.temperature if temperature is None else temperature
        self._start(rollout)
        rows = [prompts[b // n] for b in range(len(prompts) * n)]
        sessions = [Session(self.tok, d.template, d.max_prompt_len, r.episode_tokens, r.max_turns, r.max_new_tokens)
                    for _ in rows]
        keys = [self.endpoint.open(s, None if seed is None else seed + b) for b, s in enumerate(sessions)]
        self.batcher.temperature = temperature
        out: list = [TimeoutError(f"the agent ran past rollout.agent_timeout_s={r.agent_timeout_s:g}")] * len(rows)
        running = [True] * len(rows)

        def episode(b: int) -> None:
            try:
                out[b] = self.fn(self.endpoint.base_url, keys[b], rows[b]["messages"], rows[b]["meta"],
                                 **({"timeout_s": r.agent_timeout_s} if r.agent.startswith("cmd:") else {}))
            except BaseException as e:  # reported per episode below
                out[b] = e
            finally:
                running[b] = False
                self.batcher.running = sum(running)

        self.batcher.running = len(rows)
        self.batcher.engine_calls = self.batcher.requests = 0
        threads = [threading.Thread(target=episode, args=(b,), name=f"agent-{b}", daemon=True) for b in range(len(rows))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + r.agent_timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for k in keys:  # the key of an episode past its deadline stops working; a late call gets 410
            self.endpoint.close_session(k)
        self.batcher.running = 0
        if self.batcher.fatal is not None:  # the engines failed: that is the run's error, not the agents'
            raise self.batcher.fatal
        samples = []
        for b, (s, got) in enumerate(zip(sessions, out)):
            where = f"agent {r.agent!r}, episode {b} (prompt {b // n}, sample {b % n})"
            try:
                if isinstance(got, BaseException) and s.ended and s.calls:
                    got = None  # the endpoint refused a call over the episode's budget: the episode ends there,
                    #             as an environment's does (finish_reason "length" for the token budget)
                if isinstance(got, BaseException):
                    cause = got.__cause__ or got.__context__  # client libraries wrap the socket's own error
                    why = f" ({type(cause).__name__}: {str(cause)[:120]})" if cause is not None else ""
                    raise AgentError(f"{where}: {type(got).__name__}: {got}{why}") from (
                        got if not isinstance(got, TimeoutError) else None)
                reward = _reward(got, where)
                if s.calls == 0:
                    raise AgentError(f"{where}: the agent made no call to the endpoint ({self.endpoint.base_url})")
                samples.append(s.sample(reward, failed=False))
            except AgentError:
                if r.env_errors == "fail":
                    raise
                failed = s.sample(None, failed=True)
                failed.info = failed.info + Counter(env_errors=1)
                samples.append(failed)
            self.endpoint.forget(keys[b])
        b = self.batcher
        return samples, episode_metrics(samples) | {"agent/engine_calls": b.engine_calls,
                                                    "agent/batch_size": b.requests / max(1, b.engine_calls)}

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        if self.batcher is not None:
            self.batcher.close()
