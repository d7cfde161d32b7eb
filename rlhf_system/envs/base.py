"""The environment protocol of multi-turn rollouts (envs/registry.py finds environments by name).

An environment is one episode's counterpart of the policy:

    env = factory(**rollout.env_args)          # one per sample (episode)
    first = env.reset(messages, meta)           # None: the prompt as the dataset gave it; else a message
                                                # list that replaces it (re-rendered with the chat template)
    step = env.step(assistant_turn_text)        # Step(observation, reward, done, info)

`observation` is a list of chat messages (role "tool" or "user") that the chat template renders and the
policy reads before its next turn, or None when the episode is over. `reward` is this turn's reward; the
episode's return is the sum of its turns' rewards plus the run's reward sources (rules, reward model,
remote) scored on the final assistant turn. `info` holds counters the run sums into its metrics (e.g.
tool_calls, tool_errors). The rollout runner (trainers/episodes.py) calls `step` with a deadline
(rollout.env_timeout_s) and checks what comes back; an environment needs no threading of its own.

Environments are registered by name (envs/registry.py `register`) or named in a config as
"path/to/file.py:ClassOrFactory", like reward rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_system.errors import UserError


class EnvError(UserError):
    """An environment or its configuration is unusable."""


@dataclass
class Step:
    observation: list[dict] | None = None   # messages for the policy's next turn; None: nothing more
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)  # counters, summed over the batch into metrics


class Environment:
    """Base class (optional: any object with these methods works)."""

    def reset(self, messages: list[dict], meta: dict) -> list[dict] | None:
        return None

    def step(self, turn: str) -> Step:
        raise NotImplementedError

    def close(self) -> None:
        pass


def check_observation(obs, where: str) -> list[dict] | None:
    """The observation as a message list; malformed: EnvError naming `where` (env, sample, turn)."""
    if obs is None:
        return None
    if not isinstance(obs, list) or not obs:
        raise EnvError(f"{where}: the observation must be a non-empty list of messages or None, got "
                       f"{type(obs).__name__} {str(obs)[:80]!r}")
    for i, m in enumerate(obs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise EnvError(f"{where}: observation message {i} must be {{'role': str, 'content': str}}, got "
                           f"{str(m)[:80]!r}")
        if m["role"] == "assistant":
            raise EnvError(f"{where}: observation message {i} has role 'assistant'; the policy writes those")
    return obs
