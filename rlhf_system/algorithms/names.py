"""The algorithms' names, in one place and without torch, so that the config's choices
(config.AlgorithmConfig) are these tuples rather than copies of them."""

from __future__ import annotations

# algorithms/advantages.compute_advantages dispatches on these
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "opd")
# group estimators compare samples of the same prompt: the baseline of one is the others
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
# workers/actor.POLICY_LOSSES maps these to the loss functions (losses.py, grpo_family.py)
POLICY_LOSSES = ("ppo", "gspo", "cispo")
