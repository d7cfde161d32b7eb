"""One agent episode's tokens, kept token in, token out: what the endpoint (endpoint.py) generates from and
what the trainer later trains on.

    s = Session(tokenizer, template, max_prompt_len, budget, max_calls, max_new_tokens)
    ids, max_new = s.begin_call(messages, tools, max_tokens)    # the exact ids the engine continues
    text = s.end_call(engine_sample)                           # what the agent reads back
    ...
    sample = s.sample()                                        # trainers/episodes.py's sample format

The first call's messages are rendered with the chat template (and its `tools`) into the prompt. Every
later call must send the conversation so far, unchanged, plus new messages (tool results, user turns):
only those new messages are rendered (data/tokenize.render_observation) and appended, and the engine's
own completion tokens stay as they were sampled. So nothing the policy produced is decoded and
re-encoded, and the trainer sees the very ids the engine sampled and consumed. A call that rewrites
the history is refused (AgentCallError, status 400), not silently re-tokenised.
"""

from __future__ import annotations

from collections import Counter

from rlhf_system.data.samples import Generation, Sample


class AgentCallError(Exception):
    """A request the endpoint refuses, with its HTTP status; the message is the one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _turn(m) -> tuple[str, str]:
    """A message as (role, content text): what must stay equal across calls. Clients echo assistant
    messages back with extra fields (tool_calls=None, refusal=None); those do not count."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise AgentCallError(400, f"each message must be an object with a 'role', got {str(m)[:60]!r}")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI's content parts: the text parts, joined
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if content is not None and not isinstance(content, str):
        raise AgentCallError(400, f"message content must be a string or text parts, got {type(content).__name__}")
    return m["role"], content or ""


class Session:
    def __init__(self, tokenizer, template: str, max_prompt_len: int, budget: int, max_calls: int,
                 max_new_tokens: int):
        self.tok, self.template = tokenizer, template
        self.max_prompt_len, self.budget, self.max_calls, self.max_new_tokens = (max_prompt_len, budget, max_calls,
                                                                                 max_new_tokens)
        self.prompt_ids: list[int] | None = None
        self.ids: list[int] = []        # every token after the prompt
        self.mask: list[int] = []       # 1: sampled by the engine (trained); 0: rendered messages
        self.logprobs: list[float] = []
        self.history: list[tuple[str, str]] = []  # the conversation the next call must start with
        self.tools = None
        self.kind: str | None = None    # "chat" or "text" (/v1/completions): one kind per episode
        self.text_so_far = ""           # "text": the prompt and completions the next prompt must start with
        self.calls, self.text, self.finish = 0, "", "stop"
        self.ended = ""                 # why a call was refused for a spent budget ("turns", "tokens")
        self.info: Counter = Counter()

    def begin_call(self, messages: list, tools=None, max_tokens: int | None = None) -> tuple[list[int], int]:
        """The ids to continue and the new-token limit of this call; AgentCallError if it cannot be served."""
        from rlhf_system.data.sources import DataError
        from rlhf_system.data.tokenize import render_observation, render_prompt

        if not isinstance(messages, list) or not messages:
            raise AgentCallError(400, "'messages' must be a non-empty list")
        self._check_kind("chat")
        turns = [_turn(m) for m in messages]
        if self.prompt_ids is None:
            text = render_prompt(self.tok, [dict(role=r, content=c) for r, c in turns], self.template, tools=tools)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_prompt_len:
                raise AgentCallError(400, f"the first prompt is {len(ids)} tokens, over data.max_prompt_len="
                                          f"{self.max_prompt_len}")
            self.prompt_ids, self.tools = ids, tools
        else:
            k = len(self.history)
            if turns[:k] != self.history:
                bad = next((i for i, (a, b) in enumerate(zip(turns, self.history)) if a != b), min(len(turns), k))
                raise AgentCallError(400, f"messages[{bad}] differs from the episode's conversation: each call must "
                                          "send the conversation so far unchanged (token in, token out), then new "
                                          "messages")
            if len(turns) == k:
                raise AgentCallError(400, "no new message after the last assistant turn")
            if turns[k][0] == "assistant":
                raise AgentCallError(400, f"messages[{k}] is an assistant turn the engine did not write")
            if tools != self.tools:
                raise AgentCallError(400, "'tools' changed within an episode; the first call's are in its prompt")
            try:
                obs = render_observation(self.tok, [dict(role=r, content=c) for r, c in turns[k:]], self.template,
                                         "agent call")
            except DataError as e:  # a template that cannot append messages token for token
                raise AgentCallError(400, str(e)) from None
            self._append(self.tok(obs, add_special_tokens=False)["input_ids"], None)
        self.history = turns
        return self._ready(max_tokens)

    def begin_text(self, prompt: str, max_tokens: int | None = None) -> tuple[list[int], int]:
        """/v1/completions: raw text, no chat template. A later prompt must start with the earlier prompt
        and completions; only the text after them is tokenised and appended."""
        if not isinstance(prompt, str) or not prompt:
            raise AgentCallError(400, "'prompt' must be a non-empty string")
        self._check_kind("text")
        if self.prompt_ids is None:
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_prompt_len:
                raise AgentCallError(400, f"the first prompt is {len(ids)} tokens, over data.max_prompt_len="
                                          f"{self.max_prompt_len}")
            self.prompt_ids = ids
        else:
            if not prompt.startswith(self.text_so_far):
                raise AgentCallError(400, "the prompt does not start with the episode's earlier prompt and "
                                          "completions (token in, token out)")
            delta = prompt[len(self.text_so_far):]
            if not delta:
                raise AgentCallError(400, "no new text after the last completion")
            self._append(self.tok(delta, add_special_tokens=False)["input_ids"], None)
        self.text_so_far = prompt
        return self._ready(max_tokens)

    def _check_kind(self, kind: str) -> None:
        if self.kind not in (None, kind):
            raise AgentCallError(400, f"this episode started with {self.kind} calls; it cannot mix in {kind} ones")
        if self.calls >= self.max_calls:
            self.ended = "turns"
            raise AgentCallError(409, f"this episode has made its {self.max_calls} calls (rollout.max_turns)")
        self.kind = kind

    def _ready(self, max_tokens: int | None) -> tuple[list[int], int]:
        room = self.budget - len(self.ids)
        if room <= 0:
            self.ended, self.finish = "tokens", "length"
            raise AgentCallError(409, f"this episode has used its {self.budget} tokens (rollout.max_episode_tokens)")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise AgentCallError(400, f"max_tokens must be a positive integer, got {max_tokens!r}")
        return self.prompt_ids + self.ids, min(room, self.max_new_tokens, max_tokens or self.max_new_tokens)

    def end_call(self, gen: Generation) -> str:
        """Record the engine's completion; returns its text."""
        ids = list(gen.response_ids)
        self._append(ids, list(gen.logprobs))
        self.calls += 1
        self.finish = gen.finish_reason
        self.text = self.tok.decode(ids, skip_special_tokens=True)
        self.history = self.history + [("assistant", self.text)]
        self.text_so_far += self.text
        return self.text

    _STATE = ("prompt_ids", "ids", "mask", "logprobs", "history", "tools", "kind", "text_so_far", "calls", "text")

    def checkpoint(self) -> tuple:
        """The token state, for `restore` after a call that failed part-way (why an episode ended stays)."""
        return tuple(list(v) if isinstance(v, list) else v for v in (getattr(self, k) for k in self._STATE))

    def restore(self, state: tuple) -> None:
        for k, v in zip(self._STATE, state):
            setattr(self, k, v)

    def _append(self, ids: list[int], logprobs: list[float] | None) -> None:
        self.ids += ids
        self.mask += [0 if logprobs is None else 1] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def sample(self, reward: float | None, failed: bool) -> Sample:
        """trainers/episodes.py's sample, with the episode's own prompt ids (its first call's, which the agent
        chose) and the agent's reward as the environment reward."""
        if self.calls and self.mask[-1] == 0:  # rendered messages after the last completion: never consumed
            last = len(self.mask) - self.mask[::-1].index(1)
            self.ids, self.mask, self.logprobs = self.ids[:last], self.mask[:last], self.logprobs[:last]
        return Sample(self.prompt_ids, self.ids, self.logprobs, self.finish, self.text, action_mask=self.mask,
                      env_reward=float(reward or 0.0), env_failed=failed, turns=self.calls,
                      info=self.info | Counter(agent_calls=self.calls))
