"""Rule-based and remote rewards for RL.

registry: reward functions `fn(prompt, response, meta) -> float` by name (built-in synthetic-task
rules) or by "path/to/file.py:function", and RuleRewards to combine them with weights.
server: the `rlhf serve-reward` HTTP backend that scores batches with such rules.
client: RemoteReward, the batching, retrying HTTP client of that server.
"""

from rlhf_system.rewards.client import RemoteReward, RewardServerError, from_config
from rlhf_system.rewards.registry import REGISTRY, RewardError, RuleRewards, load_reward_fn, register

__all__ = [
    "REGISTRY", "RemoteReward", "RewardError", "RewardServerError", "RuleRewards", "from_config",
    "load_reward_fn", "register",
]
