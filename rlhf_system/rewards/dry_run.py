"""Every reward the PPO run will call, tried once on real prompt rows before any worker starts.

    dry_run(rules, remote, rows, where)     # rows: prompt rows as the PPO step sees them

A rule that raises, returns a non-number, NaN or inf, or needs a `meta` key the dataset lacks; a reward
server that is down, rejects the token or returns the wrong number of scores: each would otherwise
stop the run at its first step, a minute in, after Ray, DeepSpeed and vLLM have started. The
responses tried are the row's reference answer (when it has one) and an empty string, the two ends
of what a policy produces.
"""

from __future__ import annotations

import json
import math

from rlhf_system.rewards.client import RemoteReward, RewardServerError
from rlhf_system.rewards.registry import RewardError, RuleRewards

ROWS = 4  # prompt rows tried


def _inputs(rows: list[dict]) -> tuple[list[str], list[str], list[dict]]:
    prompts, responses, metas = [], [], []
    for row in rows:
        for response in dict.fromkeys((str(row["meta"].get("answer", "")), "")):  # distinct, in order
            prompts.append(json.dumps(row["messages"]))  # as ppo.score passes them
            responses.append(response)
            metas.append(row["meta"])
    return prompts, responses, metas


def dry_run(rules: RuleRewards | None, remote: RemoteReward | None, rows: list[dict], where: str) -> None:
    prompts, responses, metas = _inputs(rows[:ROWS])
    if rules is not None:
        for name, fn in zip(rules.names, rules.fns):
            for p, r, m in zip(prompts, responses, metas):
                _check_rule(name, fn, p, r, m, f"{where}, response {r[:40]!r}")
    if remote is not None:
        try:
            scores = remote.score(prompts, responses, metas)
        except RewardServerError as e:
            if "bearer token" in str(e):  # the user's setting, not the server's state
                raise RewardError(f"rewards.remote_url: {e}") from None
            raise RewardServerError(f"rewards.remote_url: {e} (checked before start-up on {where})") from None
        if len(scores) != len(prompts) or not all(math.isfinite(s) for s in scores):  # client checks; belt
            raise RewardError(f"rewards.remote_url {remote.url}: unusable scores {scores[:4]} on {where}")


def _check_rule(name: str, fn, prompt: str, response: str, meta: dict, where: str) -> None:
    try:
        value = fn(prompt, response, meta)
    except RewardError as e:
        raise RewardError(f"rewards.rules '{name}' on {where}: {e}") from None
    except Exception as e:  # the user's function: its own exception, named with the rule and the row
        first = (str(e).splitlines() or [""])[0]
        raise RewardError(f"rewards.rules '{name}' raised {type(e).__name__}: {first} on {where}. "
                          "Fix: the function must return a float for every (prompt, response, meta)") from e
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        got = f"{type(value).__name__} {value!r}"[:80]
        raise RewardError(f"rewards.rules '{name}' returned {got} on {where}; it must return a finite float")
