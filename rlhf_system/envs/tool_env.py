"""The `tools` environment: the policy may call tools (envs/tools.py) before it answers.

Each assistant turn either holds tool calls, which run and come back as tool-role messages for the
next turn, or holds none, which makes it the final answer and ends the episode. Tool turns earn no
reward of their own: the run's reward sources score the final answer, so a call is worth making
exactly when it leads to a better answer. `info` counts calls, failed calls (malformed ones included)
and timeouts, which the run reports as tool-call and tool-success rates.

    rollout.env=tools  rollout.tools=[calculator, python]  rollout.max_turns=3
"""

from __future__ import annotations

from rlhf_system.envs.base import EnvError, Environment, Step
from rlhf_system.envs.tools import TOOLS, CallError, parse_calls


class ToolEnv(Environment):
    def __init__(self, tools: list[str] = ("calculator",), tool_timeout_s: float = 5.0, tool_memory_mb: int = 256):
        unknown = [t for t in tools if t not in TOOLS]
        if unknown or not tools:
            raise EnvError(f"unknown tool(s) {unknown} in rollout.tools; available: {', '.join(sorted(TOOLS))}"
                           if unknown else "rollout.tools is empty: the tools environment needs at least one tool")
        self.tools = {t: TOOLS[t] for t in tools}
        self.limits = {"python": {"timeout_s": tool_timeout_s, "memory_mb": tool_memory_mb}}

    def step(self, turn: str) -> Step:
        calls = parse_calls(turn, self.tools)
        if not calls:
            return Step(None, 0.0, True, {"answers": 1})
        replies, errors, timeouts = [], 0, 0
        for call in calls:
            try:
                if isinstance(call, CallError):
                    raise call
                result = self.tools[call.name](**call.arguments, **self.limits.get(call.name, {}))
            except CallError as e:
                result, errors = f"error: {e}", errors + 1
                timeouts += "timed out" in str(e)
            except TypeError as e:  # arguments the tool does not take
                result, errors = f"error: bad arguments for {call.name!r} ({e})", errors + 1
            replies.append({"role": "tool", "content": result})
        return Step(replies, 0.0, False, {"tool_calls": len(calls), "tool_errors": errors, "tool_timeouts": timeouts})
