"""Environments for multi-turn rollouts (base.py: the protocol and registry) and the tools a policy can
call in them (tools.py, sandbox.py; tool_env.py: the `tools` environment). The PPO controller's episode
runner (trainers/episodes.py) drives them; nothing here knows about engines or workers."""
