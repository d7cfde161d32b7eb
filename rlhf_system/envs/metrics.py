"""Metrics of a batch of episodes (trainers/episodes.py's samples, or an agent program's: agents/), logged
per step and per held-out set."""

from __future__ import annotations

from collections import Counter


def episode_metrics(samples: list[dict]) -> dict:
    """Turns, environment reward and failures, and the tool counters as rates per episode and per call."""
    k = len(samples)
    info: Counter = Counter()
    for s in samples:
        info.update(s.info)
    calls = info["tool_calls"]
    out = {"env/turns": sum(s.turns for s in samples) / k, "env/reward": sum(s.env_reward for s in samples) / k,
           "env/errors": info["env_errors"],
           "env/observation_tokens": sum(len(s.action_mask) - sum(s.action_mask) for s in samples) / k}
    if "tool_calls" in info or "answers" in info:
        out |= {"tool/call_rate": sum(s.info.get("tool_calls", 0) > 0 for s in samples) / k,
                "tool/calls": calls / k,
                "tool/success": (calls - info["tool_errors"]) / calls if calls else 0.0,
                "tool/timeouts": info["tool_timeouts"]}
    return out
