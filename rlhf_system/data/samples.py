"""The rollout's typed records: what an engine returns (`Generation`) and what an episode becomes
(`Sample`), from the engines through the episodes (trainers/episodes.py, agents/) to the scoring and the
Experience (trainers/ppo_samples.py, role_calls.py).

    g = engine.generate(prompt_ids, n=4, temperature=1.0, seed=0)[0]       # a Generation
    s = Sample(prompt_ids=p, response_ids=g.response_ids, logprobs=g.logprobs,
               finish_reason=g.finish_reason, text=tokenizer.decode(g.response_ids))

Both are plain dataclasses of lists and numbers: they pickle across Ray as they are, and `Sample` goes
to and from JSON (a checkpoint's batches in flight, trainers/pipeline.py) without loss.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Generation:
    """One completion of one engine call."""
    response_ids: list[int]
    logprobs: list[float]        # the sampling distribution's (after temperature); 0.0 each when greedy
    finish_reason: str           # vLLM's: "stop" or "length"


@dataclass
class Sample:
    """One episode: the prompt turn 1 continued and every token after it."""
    prompt_ids: list[int]        # the dataset's prompt, or the environment's / the agent's first one
    response_ids: list[int]      # the policy's turns and, between them, the observations' tokens
    logprobs: list[float]        # the engine's per response token; 0.0 on observation tokens
    finish_reason: str           # of the last turn, or "length" when the episode's budget ran out
    text: str                    # the last assistant turn: what the reward sources score
    action_mask: list[int] | None = None  # 1 on the policy's tokens; None: all of them (one turn)
    env_reward: float = 0.0      # the sum of the turns' rewards (an agent's: what it returned)
    env_failed: bool = False     # the environment or the agent failed (rollout.env_errors=end_episode)
    turns: int = 1
    info: Counter = field(default_factory=Counter)  # the environment's counters (tool calls, errors, ...)
    versions: list[int] | None = None  # per response token, the policy version that sampled it (partial
    #                                   rollouts, trainers/partial.py); None: the batch's one version
    off_policy: bool = False     # the data's reference response, not sampled (GKD's off-policy share,
    #                              trainers/gkd.py); logprobs are then 0.0 each

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"info": dict(self.info)}

    @classmethod
    def from_json(cls, d: dict) -> Sample:
        return cls(**(d | {"info": Counter(d.get("info", {}))}))
