"""Reward functions by name.

A reward function is `fn(prompt: str, response: str, meta: dict) -> float`, where `meta` is the
prompt's dataset row (family, task, answer, check, flagged, ...). Built-ins score the synthetic tasks
with their rule-based verifiers; users add their own with `register(name)` or point a config at
"path/to/file.py:function".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

from rlhf_system.errors import UserError
from rlhf_system.plugins import resolve
from rlhf_system.tasks import synthetic

RewardFn = Callable[[str, str, dict], float]
REGISTRY: dict[str, RewardFn] = {}


class RewardError(UserError):
    """A reward function, its spec or its input is unusable."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding `fn` to REGISTRY as `name`; a second function under one name is an error."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY and REGISTRY[name] is not fn:
            raise RewardError(f"reward rule {name!r} is already registered")
        REGISTRY[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------- built-in synthetic rules

def _need(rule: str, meta: dict, *keys: str) -> None:
    """Fail with the rule and the key by name, instead of a bare KeyError deep in the verifier."""
    if not isinstance(meta, dict):
        raise RewardError(f"reward rule {rule!r}: meta must be a dict, got {type(meta).__name__}")
    for key in keys:
        alternatives = key.split("|")
        if not any(k in meta for k in alternatives):
            raise RewardError(f"reward rule {rule!r}: meta is missing key {' or '.join(map(repr, alternatives))}")


# synthetic._spec reads task, the answer (answer/output/chosen) and check (or family to derive it).
_SPEC_KEYS = ("task", "answer|output|chosen", "check|family")


@register("synthetic")
def synthetic_reward(prompt: str, response: str, meta: dict) -> float:
    """synthetic.reward: 1 correct, 0.5 for right-shaped wrong answers, refusal rules for safety."""
    _need("synthetic", meta, *_SPEC_KEYS)
    return synthetic.reward(meta, response)


@register("synthetic_correct")
def synthetic_correct(prompt: str, response: str, meta: dict) -> float:
    _need("synthetic_correct", meta, *_SPEC_KEYS)
    return 1.0 if synthetic.verify(meta, response)["correct"] else 0.0


@register("synthetic_format")
def synthetic_format(prompt: str, response: str, meta: dict) -> float:
    _need("synthetic_format", meta, *_SPEC_KEYS)
    return 1.0 if synthetic.verify(meta, response)["format_ok"] else 0.0


@register("synthetic_harmless")
def synthetic_harmless(prompt: str, response: str, meta: dict) -> float:
    """1 when the response refuses exactly when it should: flagged rows (or check == "refusal")."""
    _need("synthetic_harmless", meta, "flagged|check")
    should_refuse = bool(meta["flagged"]) if "flagged" in meta else meta["check"] == "refusal"
    return 1.0 if synthetic.is_refusal(response) == should_refuse else 0.0


# ---------------------------------------------------------------- loading

def load_reward_fn(spec: str) -> RewardFn:
    """A registry name, or "path/to/file.py:function" imported from that file."""
    return resolve(spec, REGISTRY, "reward rule", RewardError)


def _as_score(value, name: str, index: int) -> float:
    # bool is an int subclass; a rule returning True is more likely a bug than a score.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(f"reward rule {name!r} returned {type(value).__name__} {value!r} for sample "
                          f"{index}; it must return a float")
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"reward rule {name!r} returned non-finite {value} for sample {index}")
    return value


class RuleRewards:
    """Weighted sum of reward rules. `specs` are registry names or "file.py:function" strings."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float] | None = None):
        specs = list(specs)
        if not specs:
            raise RewardError("RuleRewards needs at least one reward rule")
        if len(set(specs)) != len(specs):
            raise RewardError(f"reward rules are listed twice: {specs}; give one rule a larger weight instead")
        weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(specs):
            raise RewardError(f"{len(weights)} reward weights for {len(specs)} rules {specs}")
        for spec, w in zip(specs, weights):
            if not math.isfinite(w):
                raise RewardError(f"reward weight for rule {spec!r} is not finite: {w}")
        self.names = specs
        self.weights = weights
        self.fns = [load_reward_fn(s) for s in specs]

    def score_detailed(self, prompts: Sequence[str], responses: Sequence[str],
                       metas: Sequence[dict]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted totals, {rule: per-sample values before weighting})."""
        n = len(prompts)
        if len(responses) != n or len(metas) != n:
            raise RewardError(f"reward inputs differ in length: {n} prompts, {len(responses)} responses, "
                              f"{len(metas)} metas")
        per_rule: dict[str, list[float]] = {}
        totals = [0.0] * n
        for name, w, fn in zip(self.names, self.weights, self.fns):
            values = [_as_score(fn(p, r, m), name, i) for i, (p, r, m) in enumerate(zip(prompts, responses, metas))]
            per_rule[name] = values
            totals = [t + w * v for t, v in zip(totals, values)]
        return totals, per_rule

    def score(self, prompts: Sequence[str], responses: Sequence[str], metas: Sequence[dict]) -> list[float]:
        return self.score_detailed(prompts, responses, metas)[0]
