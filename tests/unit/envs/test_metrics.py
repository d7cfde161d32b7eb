"""envs/metrics.episode_metrics on hand-made episodes: rates per episode and per tool call."""

from collections import Counter

from rlhf_system.data.samples import Sample
from rlhf_system.envs.metrics import episode_metrics


def sample(turns, reward, mask, **info):
    return Sample([0], [1] * len(mask), [0.0] * len(mask), "stop", "", action_mask=mask, env_reward=reward,
                  turns=turns, info=Counter(info))


def test_rates_per_episode_and_per_call():
    got = episode_metrics([sample(2, 1.0, [1, 1, 0, 0, 1], tool_calls=1),
                           sample(1, 0.0, [1, 1], tool_calls=0),
                           sample(2, 0.5, [1, 0, 1], tool_calls=3, tool_errors=1, env_errors=1)])
    assert got["env/turns"] == 5 / 3 and got["env/reward"] == 0.5 and got["env/errors"] == 1
    assert got["env/observation_tokens"] == 1.0  # (2 + 0 + 1) / 3
    assert got["tool/call_rate"] == 2 / 3 and got["tool/calls"] == 4 / 3 and got["tool/success"] == 3 / 4


def test_without_tools_there_are_no_tool_rates():
    got = episode_metrics([sample(1, 0.0, [1])])
    assert not any(k.startswith("tool/") for k in got)
