"""Reward registry: built-in synthetic rules on real instances, user files, weighted sums, errors."""

import math

import pytest

from rlhf_system.rewards.registry import REGISTRY, RewardError, RuleRewards, load_reward_fn, register
from rlhf_system.tasks import synthetic as S


@pytest.fixture(scope="module")
def rows():
    splits = S.generate(seed=0, n_train=50, n_test=10)
    return [inst.to_prompt() for inst in splits["train"] + splits["test_unseen_family"]]


def _by(rows, **kv):
    out = [r for r in rows if all(r[k] == v for k, v in kv.items())]
    assert out, f"no synthetic rows with {kv}"
    return out


def test_builtin_rules_on_correct_answers(rows):
    for name in ("synthetic", "synthetic_correct", "synthetic_format", "synthetic_harmless"):
        fn = REGISTRY[name]
        for r in rows:
            assert fn(r["prompt"], r["answer"], r) == 1.0, (name, r)


def test_builtin_rules_on_wrong_answers(rows):
    fmt = _by(rows, family="format")[0]
    shuffled = S._FORMATTERS[fmt["task"]](fmt["prompt"].split("\n\n")[1].split()[::-1])
    assert shuffled != fmt["answer"]
    assert REGISTRY["synthetic"](fmt["prompt"], shuffled, fmt) == 0.5  # right layout, wrong order
    assert REGISTRY["synthetic_correct"](fmt["prompt"], shuffled, fmt) == 0.0
    assert REGISTRY["synthetic_format"](fmt["prompt"], shuffled, fmt) == 1.0
    assert REGISTRY["synthetic_format"](fmt["prompt"], "no list here", fmt) == 0.0

    arith = _by(rows, family="arithmetic")[0]
    assert REGISTRY["synthetic"](arith["prompt"], str(int(arith["answer"]) + 1), arith) == 0.0
    sort = _by(rows, family="sort")[0]
    assert REGISTRY["synthetic_correct"](sort["prompt"], sort["answer"] + " 0", sort) == 0.0


def test_harmless_rewards_refusing_exactly_when_flagged(rows):
    harmless = REGISTRY["synthetic_harmless"]
    flagged, safe = _by(rows, flagged=True)[0], _by(rows, family="safety", flagged=False)[0]
    assert harmless(flagged["prompt"], "Sure, here is how.", flagged) == 0.0
    assert harmless(flagged["prompt"], "I cannot help with that.", flagged) == 1.0
    assert harmless(safe["prompt"], S.REFUSAL, safe) == 0.0  # over-refusal
    assert harmless(safe["prompt"], "Wrong but helpful.", safe) == 1.0
    # without `flagged`, check == "refusal" decides
    assert harmless("", S.REFUSAL, {"check": "refusal"}) == 1.0
    assert harmless("", S.REFUSAL, {"check": "exact"}) == 0.0


@pytest.mark.parametrize("name,meta,missing", [
    ("synthetic", {"answer": "1", "check": "exact"}, "'task'"),
    ("synthetic_correct", {"task": "add", "check": "exact"}, "'answer'"),
    ("synthetic_format", {"task": "comma", "answer": "a, b"}, "'check' or 'family'"),
    ("synthetic_harmless", {"task": "refuse"}, "'flagged' or 'check'"),
])
def test_missing_meta_key_names_rule_and_key(name, meta, missing):
    with pytest.raises(RewardError, match=f"{name}.*missing key {missing}"):
        REGISTRY[name]("p", "r", meta)


def test_register_adds_and_rejects_a_second_function():
    @register("test_const")
    def const(prompt, response, meta):
        return 0.25

    try:
        assert load_reward_fn("test_const") is const
        with pytest.raises(RewardError, match="test_const.*already registered"):
            register("test_const")(lambda p, r, m: 0.0)
    finally:
        REGISTRY.pop("test_const", None)


def test_unknown_name_lists_registered_rules():
    with pytest.raises(RewardError, match=r"unknown reward rule 'nope'.*synthetic, synthetic_correct"):
        load_reward_fn("nope")


# ---------------------------------------------------------------- user files

USER_FILE = """
def length_bonus(prompt, response, meta):
    return len(response) / 10

def nan_reward(prompt, response, meta):
    return float("nan") if meta.get("bad") else 0.0

def text_reward(prompt, response, meta):
    return "1.0"

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


def test_load_function_from_file(user_file):
    fn = load_reward_fn(f"{user_file}:length_bonus")
    assert fn("p", "abcd", {}) == pytest.approx(0.4)


def test_file_errors_name_file_and_function(user_file, tmp_path):
    missing = tmp_path / "absent.py"
    with pytest.raises(RewardError, match=f"{missing} not found.*'length_bonus'"):
        load_reward_fn(f"{missing}:length_bonus")
    with pytest.raises(RewardError, match=f"{user_file} has no 'missing_fn'"):
        load_reward_fn(f"{user_file}:missing_fn")
    with pytest.raises(RewardError, match=f"{user_file}: 'NOT_A_FUNCTION' is a int, not callable"):
        load_reward_fn(f"{user_file}:NOT_A_FUNCTION")


def test_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def f(:\n")
    with pytest.raises(RewardError, match=f"{bad} failed to import.*'f'"):
        load_reward_fn(f"{bad}:f")


# ---------------------------------------------------------------- combination

def test_weighted_sum_and_per_rule_values(rows, user_file):
    flagged, arith = _by(rows, flagged=True)[0], _by(rows, family="arithmetic")[0]
    prompts = [flagged["prompt"], arith["prompt"], arith["prompt"]]
    responses = [S.REFUSAL, arith["answer"], "x"]
    metas = [flagged, arith, arith]
    bonus = f"{user_file}:length_bonus"
    rr = RuleRewards(["synthetic_correct", "synthetic_harmless", bonus], [2.0, 0.5, 1.0])
    totals, per = rr.score_detailed(prompts, responses, metas)
    assert per["synthetic_correct"] == [1.0, 1.0, 0.0]
    assert per["synthetic_harmless"] == [1.0, 1.0, 1.0]
    assert per[bonus] == pytest.approx([len(r) / 10 for r in responses])
    expected = [2 * c + 0.5 * h + b for c, h, b in zip(per["synthetic_correct"], per["synthetic_harmless"], per[bonus])]
    assert totals == pytest.approx(expected)
    assert rr.score(prompts, responses, metas) == totals


def test_default_weights_are_one(rows):
    r = _by(rows, family="string")[0]
    rr = RuleRewards(["synthetic", "synthetic_format"])
    assert rr.score([r["prompt"]], [r["answer"]], [r]) == [2.0]


def test_bad_return_values_name_rule_and_sample(user_file):
    nan_spec, text_spec = f"{user_file}:nan_reward", f"{user_file}:text_reward"
    with pytest.raises(RewardError, match=r"nan_reward.*non-finite nan for sample 1"):
        RuleRewards([nan_spec]).score(["a", "b"], ["a", "b"], [{}, {"bad": True}])
    with pytest.raises(RewardError, match=r"text_reward.*returned str '1.0' for sample 0"):
        RuleRewards([text_spec]).score(["a"], ["a"], [{}])


def test_construction_and_input_errors():
    with pytest.raises(RewardError, match="2 reward weights for 1 rules"):
        RuleRewards(["synthetic"], [1.0, 2.0])
    with pytest.raises(RewardError, match="listed twice"):
        RuleRewards(["synthetic", "synthetic"])
    with pytest.raises(RewardError, match="not finite"):
        RuleRewards(["synthetic"], [math.inf])
    with pytest.raises(RewardError, match="at least one"):
        RuleRewards([])
    with pytest.raises(RewardError, match="2 prompts, 1 responses, 2 metas"):
        RuleRewards(["synthetic"]).score(["a", "b"], ["a"], [{}, {}])
