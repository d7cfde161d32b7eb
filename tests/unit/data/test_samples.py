"""data/samples: a checkpoint's batches in flight store their episodes as JSON; they must come back equal,
counters included, and pickle (Ray) unchanged."""

import json
import pickle
from collections import Counter

import torch

from rlhf_system.data.samples import Sample
from rlhf_system.trainers.ppo_samples import Scored


def test_sample_json_and_pickle_round_trip():
    s = Sample([5, 6], [7, 8, 9], [-0.5, 0.0, -0.25], "length", "hi", action_mask=[1, 0, 1], env_reward=0.5,
               env_failed=True, turns=2, info=Counter(tool_calls=1, env_errors=1))
    back = Sample.from_json(json.loads(json.dumps(s.to_json())))
    assert back == s and isinstance(back.info, Counter)
    assert pickle.loads(pickle.dumps(s)) == s
    assert Sample.from_json(Sample([1], [2], [0.0], "stop", "").to_json()).action_mask is None


def test_scored_round_trip_keeps_float32_scores_exact():
    scores = torch.tensor([0.1, -1.3], dtype=torch.float32)
    got = Scored([{"prompt_ids": [1]}] * 2, [Sample([1], [2], [-0.1], "stop", "a", info=Counter(x=2))] * 2, scores, {"m": 1.0})
    back = Scored.from_json(json.loads(json.dumps(got.to_json())))
    assert torch.equal(back.scores, scores) and back.samples == got.samples and back.metrics == got.metrics
