"""TRL's bench reward (trl_grpo.py: reward_len), as one of our rule functions."""


def reward_len(prompt, response, meta):
    return float(len(response)) / 100.0
