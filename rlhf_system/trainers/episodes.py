"""Rollouts as episodes: the policy and an environment (envs/) take turns, token in, token out.

    samples, metrics = run_episodes(cfg, tokenizer, rollout, prompts, seed, make_env)

Turn 1 is the single-turn rollout exactly: one engine call for all prompts, n samples each, seeded as
always. Without an environment (rollout.env empty) that is all, and the samples are what the engines
returned. With one, each assistant turn goes to the episode's environment (`step`, under a deadline,
the batch's episodes side by side in threads); its observation messages are rendered with the chat
template (data/tokenize.render_observation) and tokenised ALONE, then appended to the episode's tokens,
and the episodes still running generate their next turn from exactly those tokens. Nothing the policy
produced is ever decoded and re-encoded, so the trainer sees the very ids the engine sampled and
consumed, and chat templates cannot drift between rollout and training.

Each sample is a data/samples.Sample: the prompt ids turn 1 continued (the dataset's prompt, or the
environment's first observation), every token after them (the policy's turns and the observations in
between) with the engine's log-probs (0 on observation tokens) and the action mask, the last turn's
finish reason and text, the turns' summed reward, whether the environment failed, and its counters.

Budgets: each turn gets at most rollout.max_new_tokens, the episode at most rollout.max_episode_tokens
response tokens, observations included; a turn or an observation that does not fit ends the episode.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from rlhf_system.config import RunConfig
from rlhf_system.data.samples import Sample
from rlhf_system.envs.base import EnvError, check_observation
from rlhf_system.envs.metrics import episode_metrics

TURN_SEED = 7_368_787  # seed offset of each later turn: disjoint from turn 1's per-prompt ranges


def make_env_factory(cfg: RunConfig):
    """(factory() -> environment) for rollout.env, or None; unknown names and bad arguments fail here,
    in `prepare`, before any worker starts (one environment is built as a check)."""
    from rlhf_system.envs.registry import load_env

    r = cfg.rollout
    if not r.env:
        return None
    factory = load_env(r.env)
    kwargs = dict(r.env_args)
    if r.env == "tools":
        kwargs = {"tools": r.tools, "tool_timeout_s": r.tool_timeout_s, "tool_memory_mb": r.tool_memory_mb, **kwargs}
    try:
        factory(**kwargs).close()
    except EnvError:
        raise
    except Exception as e:
        raise EnvError(f"environment {r.env!r} could not be built with rollout.env_args={r.env_args}: "
                       f"{type(e).__name__}: {e}") from None
    return lambda: factory(**kwargs)


def _short(messages: list[dict]) -> str:
    text = messages[-1]["content"] if messages else ""
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


class _Episode:
    def __init__(self, prompt: dict, env):
        self.prompt, self.env = prompt, env
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] = []
        self.text, self.finish, self.turns = "", "stop", 0
        self.reward, self.failed, self.done = 0.0, False, False
        self.info: Counter = Counter()

    def sample(self, prompt_ids: list[int], one_turn: bool) -> Sample:
        return Sample(prompt_ids, self.ids, self.logprobs, self.finish, self.text,
                      action_mask=None if one_turn else self.mask, env_reward=self.reward, env_failed=self.failed,
                      turns=self.turns, info=self.info)


def _call(fn, timeout_s: float, eps: list[_Episode], what: str) -> list:
    """fn(episode) for each episode, all side by side (a thread each: environments mostly wait, on a
    tool's subprocess or a server), under one deadline; per episode its result or its exception, or a
    TimeoutError for a call still running at the deadline. Daemon threads: a call that never returns is
    abandoned and cannot keep the process from exiting."""
    out: list = [TimeoutError(f"no answer within rollout.env_timeout_s={timeout_s:g}")] * len(eps)

    def work(b: int) -> None:
        try:
            out[b] = fn(eps[b])
        except BaseException as e:  # reported per episode by the caller
            out[b] = e

    threads = [threading.Thread(target=work, args=(b,), name=f"env-{what}-{b}", daemon=True) for b in range(len(eps))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return list(out)


def run_episodes(cfg: RunConfig, tokenizer, rollout, prompts: list[dict], seed: int | None, make_env=None,
                 n: int | None = None, temperature: float | None = None, agent=None) -> tuple[list[Sample], dict]:
    """Samples in prompt-major order (prompt i's n samples are rows i*n .. i*n+n-1) and the episodes'
    metrics (empty without an environment). n and temperature default to the rollout's (evaluation
    passes its own); seed None samples unseeded. `agent` (agents/runner.AgentRunner, rollout.agent): an
    agent program drives the episodes instead, through the OpenAI-compatible endpoint."""
    from rlhf_system.data.tokenize import render_observation

    if agent is not None:
        return agent.run(rollout, prompts, seed, n, temperature)
    r = cfg.rollout
    n = r.n_samples_per_prompt if n is None else n
    eps = [_Episode(prompts[i // n], make_env() if make_env else None) for i in range(len(prompts) * n)]
    spec = r.env

    def where(b: int, turn: int) -> str:
        return f"environment {spec!r}, sample {b} (prompt {_short(eps[b].prompt['messages'])}), turn {turn}"

    def fail(b: int, turn: int, err: BaseException) -> None:
        if r.env_errors == "fail":
            raise EnvError(f"{where(b, turn)}: {type(err).__name__}: {err}") from (
                err if not isinstance(err, TimeoutError) else None)
        e = eps[b]
        e.failed = e.done = True
        e.info["env_errors"] += 1

    prompt_ids = [p["prompt_ids"] for p in prompts]
    if make_env is not None:  # the first observation: the dataset's prompt, or what reset gives instead
        firsts = _call(lambda e: e.env.reset(e.prompt["messages"], e.prompt["meta"]), r.env_timeout_s, eps, "reset")
        for b, got in enumerate(firsts):
            if isinstance(got, BaseException):
                fail(b, 0, got)
        prompt_ids = _first_prompts(cfg, tokenizer, prompts, firsts, n, where)
    budget = r.episode_tokens
    try:
        for turn in range(1, r.max_turns + 1):
            active = [b for b, e in enumerate(eps) if not e.done]
            if not active:
                break
            if turn == 1:  # every prompt's n samples together, as a single-turn rollout
                gen = rollout.generate(prompt_ids, n=n, temperature=temperature, seed=seed)
                running = set(active)
                gen = [g for b, g in enumerate(gen) if b in running]  # less episodes whose reset failed
            else:
                gen = rollout.generate([prompt_ids[b // n] + eps[b].ids for b in active], n=1, temperature=temperature,
                                       seed=None if seed is None else seed + TURN_SEED * (turn - 1))
            for b, g in zip(active, gen):
                e = eps[b]
                ids, lps, finish = list(g.response_ids), list(g.logprobs), g.finish_reason
                room = budget - len(e.ids)
                if len(ids) > room:
                    ids, lps, finish = ids[:room], lps[:room], "length"
                e.ids += ids
                e.mask += [1] * len(ids)
                e.logprobs += lps
                e.text = tokenizer.decode(ids, skip_special_tokens=True)
                e.finish, e.turns = finish, turn
                if make_env is None or finish == "length":
                    e.done = True
            stepping = [b for b in active if not eps[b].done]
            results = _call(lambda e: e.env.step(e.text), r.env_timeout_s, [eps[b] for b in stepping], "step")
            for b, step in zip(stepping, results):
                e = eps[b]
                if isinstance(step, BaseException):
                    fail(b, turn, step)
                    continue
                try:
                    obs = check_observation(getattr(step, "observation", "<not a Step>"), where(b, turn))
                    e.reward += float(step.reward)
                except (EnvError, TypeError, ValueError, AttributeError) as err:
                    fail(b, turn, err)
                    continue
                e.info.update(step.info or {})
                if step.done or obs is None or turn == r.max_turns:
                    e.done = True
                    continue
                obs_ids = tokenizer(render_observation(tokenizer, obs, cfg.data.template, where(b, turn)),
                                    add_special_tokens=False)["input_ids"]
                if len(e.ids) + len(obs_ids) >= budget:  # no room left for another turn
                    e.done, e.finish = True, "length"
                    continue
                e.ids += obs_ids
                e.mask += [0] * len(obs_ids)
                e.logprobs += [0.0] * len(obs_ids)
    finally:
        for e in eps:
            if e.env is not None:
                try:
                    e.env.close()
                except Exception:  # a close that fails must not hide the episode's own result or error
                    pass
    samples = [e.sample(prompt_ids[b // n], make_env is None) for b, e in enumerate(eps)]
    return samples, episode_metrics(samples) if make_env is not None else {}


def _first_prompts(cfg: RunConfig, tokenizer, prompts: list[dict], firsts: list, n: int, where) -> list[list[int]]:
    """Each prompt's ids for turn 1: the dataset's unless reset gave a first observation, which must be
    the same for the n samples of one prompt (they are generated together)."""
    from rlhf_system.data.tokenize import render_prompt

    out = []
    for i, p in enumerate(prompts):
        got = [f for f in firsts[i * n:(i + 1) * n] if not isinstance(f, BaseException)]
        if not got or all(f is None for f in got):
            out.append(p["prompt_ids"])
            continue
        if any(f != got[0] for f in got):
            raise EnvError(f"{where(i * n, 0)}: reset gave different first observations to the samples of one "
                           "prompt; they are generated together, so it must be the same for all of them")
        msgs = check_observation(got[0], where(i * n, 0))
        ids = tokenizer(render_prompt(tokenizer, msgs, cfg.data.template), add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.data.max_prompt_len:
            raise EnvError(f"{where(i * n, 0)}: the first observation is {len(ids)} tokens, over "
                           f"data.max_prompt_len={cfg.data.max_prompt_len}")
        out.append(ids)
    return out
