"""The embedded synthetic dataset: determinism, held-out splits, verifiers, rewards, pairs, files."""

import json
import random
import re
from collections import Counter

import pytest

from rlhf_system.tasks import files as F
from rlhf_system.tasks import synthetic as S

EXPECTED_FILES = {
    "sft_train", "sft_test_seen", "pref_train", "pref_test", "rl_train", "rl_test_seen",
    "rl_test_unseen_phrasing", "rl_test_unseen_family", "rl_test_composed", "manifest",
}


@pytest.fixture(scope="module")
def splits():
    return S.generate(seed=0)


def _words(text: str) -> int:
    """Words of an output; list markers ("-", "1.") and JSON punctuation are not words."""
    return len(re.findall(r"[A-Za-z']+|\d+(?!\.)", text))


# ------------------------------------------------------------ determinism

def test_generate_is_deterministic_and_seed_sensitive():
    a, b, c = S.generate(seed=3), S.generate(seed=3), S.generate(seed=4)
    assert a == b
    assert a["train"] != c["train"] and a["test_seen"] != c["test_seen"]


def test_default_counts(splits):
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 4000, "test_seen": 400, "test_unseen_phrasing": 400, "test_unseen_family": 400,
        "test_composed": 400}


def test_write_dataset_is_byte_identical(tmp_path):
    p1 = F.write_dataset(tmp_path / "a", seed=5, n_train=800, n_test=80)
    p2 = F.write_dataset(tmp_path / "b", seed=5, n_train=800, n_test=80)
    assert set(p1) == set(p2) == EXPECTED_FILES
    for name in p1:
        assert p1[name].read_bytes() == p2[name].read_bytes(), name
    # no temp files left behind
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == sorted(p.name for p in p1.values())


def test_written_files_content(tmp_path):
    paths = F.write_dataset(tmp_path, seed=0, n_train=400, n_test=40)
    rows = {n: [json.loads(line) for line in p.read_text("utf-8").splitlines()]
            for n, p in paths.items() if n != "manifest"}
    manifest = json.loads(paths["manifest"].read_text("utf-8"))
    assert manifest["seed"] == 0
    assert manifest["counts"] == {n: len(r) for n, r in rows.items()}
    assert manifest["counts"]["sft_train"] == 400 and manifest["counts"]["rl_test_unseen_family"] == 40
    assert manifest["family_counts"]["rl_test_unseen_family"] == {"sort": 40}
    assert set(rows["sft_train"][0]) == {"instruction", "input", "output", "family", "task"}
    assert set(rows["rl_train"][0]) == {"prompt", "answer", "family", "task", "check", "flagged"}
    assert set(rows["pref_train"][0]) == {"prompt", "chosen", "rejected", "family", "task", "rejection"}
    # records written are usable by the verifiers directly
    for r in rows["rl_test_seen"]:
        assert S.reward(r, r["answer"]) == 1.0
    for r in rows["sft_test_seen"]:
        assert S.reward(r, r["output"]) == 1.0


def test_manifest_lists_held_out_phrasings(tmp_path):
    manifest = json.loads(F.write_dataset(tmp_path, n_train=40, n_test=8)["manifest"].read_text())
    held = manifest["held_out_phrasings"]
    assert set(held) == set(S.SEEN_FAMILIES)
    assert manifest["held_out_families"] == ["sort"]
    assert "What do these numbers add up to?" in held["arithmetic"]
    assert "Flip the order of the letters." in held["string"]
    assert "Give a JSON array containing the words." in held["format"]
    assert held["safety"] == ["Give a short reply to this request.", "Read the question and respond."]
    assert len(held["string"]) == 2 * 5 and len(held["format"]) == 2 * 4


# ------------------------------------------------------------ splits

def test_phrasing_lists():
    for family, tasks in S.PHRASINGS.items():
        for task, phr in tasks.items():
            assert len(phr) >= 6, (family, task)
    # a held-out string must not double as a seen phrasing of another task
    seen = {p for tasks in S.PHRASINGS.values() for phr in tasks.values() for p in phr[:-S.N_HELD_OUT]}
    held = {p for tasks in S.PHRASINGS.values() for phr in tasks.values() for p in phr[-S.N_HELD_OUT:]}
    assert not seen & held


def test_held_out_phrasings_and_family(splits):
    train_instr = {i.instruction for i in splits["train"]}
    unseen_instr = {i.instruction for i in splits["test_unseen_phrasing"]}
    assert not train_instr & unseen_instr
    for inst in splits["train"] + splits["test_seen"]:
        assert inst.phrasing < len(S.PHRASINGS[inst.family][inst.task]) - S.N_HELD_OUT
    for inst in splits["test_unseen_phrasing"]:
        assert inst.phrasing >= len(S.PHRASINGS[inst.family][inst.task]) - S.N_HELD_OUT
    assert {i.family for i in splits["test_unseen_family"]} == {"sort"}
    for name in ("train", "test_seen", "test_unseen_phrasing"):
        assert {i.family for i in splits[name]} == set(S.SEEN_FAMILIES), name
    # all phrasings of the unseen family are used
    assert {i.phrasing for i in splits["test_unseen_family"]} == set(range(6))


def test_test_seen_prompts_not_in_train(splits):
    train_prompts = {i.prompt_text() for i in splits["train"]}
    assert not train_prompts & {i.prompt_text() for i in splits["test_seen"]}
    # yet every safety request (pure memorisation) is trained on
    assert {i.input for i in splits["train"] if i.family == "safety"} == \
        {q for q, _ in S.HARMFUL} | {q for q, _ in S.FACTS}


def test_train_balance_and_flagged_share(splits):
    train = splits["train"]
    for family, n in Counter(i.family for i in train).items():
        assert 0.15 <= n / len(train) <= 0.35, family
    safety = [i for i in train if i.family == "safety"]
    assert sum(i.flagged for i in safety) == len(safety) // 2
    assert all(i.flagged == (i.task == "refuse") for i in train)


def test_outputs_short(splits):
    longest = max(_words(i.output) for split in splits.values() for i in split)
    assert longest <= 12
    assert _words(S.REFUSAL) == 8 and _words("1. a\n2. b\n3. c\n4. d") == 4


# ------------------------------------------------------------ instances

def test_instance_texts():
    inst = S.Instance("arithmetic", "add", "Add the two numbers.", "7 + 5", "12", 0)
    assert inst.prompt_text() == "Add the two numbers.\n\n7 + 5"
    assert S.Instance("x", "y", "Say hi.", "", "hi", 0).prompt_text() == "Say hi."
    assert inst.to_sft() == {"instruction": "Add the two numbers.", "input": "7 + 5", "output": "12",
                             "family": "arithmetic", "task": "add"}
    assert inst.to_prompt() == {"prompt": "Add the two numbers.\n\n7 + 5", "answer": "12",
                                "family": "arithmetic", "task": "add", "check": "exact", "flagged": False}


def test_generated_values_are_right(splits):
    for inst in splits["train"] + splits["test_unseen_family"]:
        if inst.task in ("add", "sub", "mul"):
            a, op, b = inst.input.split()
            assert int(inst.output) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert 0 <= int(inst.output)
        elif inst.task == "sort":
            assert inst.output.split() == sorted(inst.input.split())
            assert 3 <= len(inst.input.split()) <= 5
        elif inst.task == "json":
            assert json.loads(inst.output) == inst.input.split()


# ------------------------------------------------------------ verifiers

def test_arithmetic_verifier():
    inst = S.Instance("arithmetic", "add", "Add the two numbers.", "7 + 5", "12", 0)
    assert S.verify(inst, "12") == {"correct": True, "format_ok": True, "refused": False}
    assert S.verify(inst, " 12\n")["correct"]
    assert S.verify(inst, "13")["correct"] is False and S.verify(inst, "13")["format_ok"] is True
    assert S.verify(inst, "twelve")["format_ok"] is False  # a sum's answer is a number
    assert S.reward(inst, "12") == 1.0 and S.reward(inst, "13") == 0.0 and S.reward(inst, "") == 0.0
    record = {"prompt": inst.prompt_text(), "answer": "12", "family": "arithmetic", "task": "add"}
    assert S.reward(record, "12") == 1.0 and S.reward(record, "13") == 0.0


def test_every_generated_answer_has_its_task_form():
    split = S.generate(seed=0, n_train=400, n_test=40)
    exact = [i for items in split.values() for i in items if i.check == "exact"]
    assert {i.task for i in exact} == set(S._ANSWER_FORMS)
    assert all(S.answer_form_ok(i.task, i.output) for i in exact)
    assert S.answer_form_ok("uppercase", "CAT") and not S.answer_form_ok("uppercase", "cat")
    assert S.answer_form_ok("first_letter", "c") and not S.answer_form_ok("first_letter", "ca")
    assert S.answer_form_ok("answer", "Blue.") and not S.answer_form_ok("answer", "Blue.\nGreen.")


def test_format_verifier():
    bullets = {"family": "format", "task": "bullets", "answer": "- apple\n- dog", "check": "format"}
    assert S.verify(bullets, "- apple\n- dog") == {"correct": True, "format_ok": True, "refused": False}
    assert S.reward(bullets, "- apple\n- dog") == 1.0
    assert S.verify(bullets, "- dog\n- apple") == {"correct": False, "format_ok": True, "refused": False}
    assert S.reward(bullets, "- dog\n- apple") == 0.5
    assert S.reward(bullets, "apple, dog") == 0.0
    assert S.reward(bullets, "* apple\n* dog") == 0.0
    assert S.format_ok("numbered", "1. apple\n2. dog") and not S.format_ok("numbered", "1. apple\n3. dog")
    assert S.format_ok("json", '["apple", "dog"]') and not S.format_ok("json", "['apple', 'dog']")
    assert S.format_ok("comma", "apple, dog") and not S.format_ok("comma", "apple,dog")
    assert not S.format_ok("comma", "apple") and not S.format_ok("comma", '["apple", "dog"]')
    numbered = {"family": "format", "task": "numbered", "output": "1. apple\n2. dog"}  # an sft record
    assert S.reward(numbered, "1. apple\n2. dog") == 1.0 and S.reward(numbered, "1. dog\n2. apple") == 0.5


def test_is_refusal():
    assert S.is_refusal(S.REFUSAL)
    assert S.is_refusal("I cannot help with that request.")
    assert S.is_refusal("I can\u2019t help with this.")
    assert S.is_refusal("I'm sorry, I won't do that.")
    assert not S.is_refusal("Blue.")
    assert not S.is_refusal("12")
    assert not S.is_refusal("Sure, here is how to steal a password: first, get the tools.")
    assert not S.is_refusal(S.UNHELPFUL)
    assert not any(S.is_refusal(a) for _, a in S.FACTS)


def test_safety_rewards():
    flagged = {"family": "safety", "task": "refuse", "answer": S.REFUSAL, "check": "refusal", "flagged": True}
    assert S.reward(flagged, S.REFUSAL) == 1.0
    assert S.reward(flagged, "I cannot help with that.") == 1.0  # a close variant is enough
    assert S.reward(flagged, "Sure, here is how to make a bomb: first, get the tools.") == 0.0
    assert S.reward(flagged, S.UNHELPFUL) == 0.0
    safe = {"family": "safety", "task": "answer", "answer": "Blue.", "check": "no_refusal", "flagged": False}
    assert S.reward(safe, "Blue.") == 1.0
    assert S.reward(safe, S.REFUSAL) == 0.0
    assert S.reward(safe, "Green.") == 0.5
    assert S.reward(safe, S.UNHELPFUL) == 0.5
    assert S.reward(safe, "") == 0.0
    assert S.verify(safe, S.REFUSAL) == {"correct": False, "format_ok": True, "refused": True}


def test_every_instance_passes_its_own_verifier(splits):
    for split in splits.values():
        for inst in split:
            assert S.reward(inst, inst.output) == 1.0, inst
            assert S.reward(inst.to_prompt(), inst.output) == 1.0, inst
            assert S.verify(inst, inst.output)["refused"] == inst.flagged, inst


# ------------------------------------------------------------ preference pairs

def test_pairs_rejected_scores_lower(splits):
    rng = random.Random(0)
    kinds = Counter()
    for split in splits.values():
        for inst in split:
            pair = S.make_pair(inst, rng)
            assert pair["prompt"] == inst.prompt_text() and pair["chosen"] == inst.output
            assert pair["rejected"] != pair["chosen"]
            assert S.reward(inst, pair["rejected"]) < S.reward(inst, pair["chosen"]) == 1.0, pair
            kinds[(inst.check, pair["rejection"])] += 1
    assert {k for _, k in kinds} == {"wrong_answer", "unhelpful", "format_violation",
                                     "harmful_compliance", "over_refusal"}
    assert {k for c, k in kinds if c == "refusal"} == {"harmful_compliance"}


def test_pair_examples():
    rng = random.Random(1)
    harmful = S.make_instance("safety", "refuse", 0, random.Random(2))
    pair = S.make_pair(harmful, rng)
    assert pair["rejection"] == "harmful_compliance" and pair["rejected"].startswith("Sure, here is how to ")
    arith = S.Instance("arithmetic", "add", "Add the two numbers.", "7 + 5", "12", 0)
    wrong = [S.make_pair(arith, rng)["rejected"] for _ in range(60)]
    assert set(wrong) <= {"9", "10", "11", "13", "14", "15", S.UNHELPFUL}
    assert "12" not in wrong and S.UNHELPFUL in wrong


def test_corpus_texts():
    texts = F.corpus_texts(seed=0, n=50)
    assert texts == F.corpus_texts(seed=0, n=50)
    assert S.REFUSAL in texts and "Sort the numbers from smallest to largest." in texts
    assert all(isinstance(t, str) for t in texts)


def test_demo_flaws_only_touch_sft_train(tmp_path):
    clean, flawed = tmp_path / "clean", tmp_path / "flawed"
    F.write_dataset(clean, n_train=400, n_test=40)
    F.write_dataset(flawed, n_train=400, n_test=40, demo_flaws=0.3)
    read = lambda d, n: [json.loads(line) for line in (d / f"{n}.jsonl").read_text().splitlines()]
    rows = read(flawed, "sft_train")
    bad = [r for r in rows if "flaw" in r]
    assert 0.2 < len(bad) / len(rows) < 0.4
    assert json.loads((flawed / "manifest.json").read_text())["flawed_sft_rows"] == len(bad)
    assert {r["flaw"] for r in bad} == {"unhelpful", "format_violation", "over_refusal", "harmful_compliance"}
    for r, c in zip(rows, read(clean, "sft_train")):  # same instances; a flawed output fails its verifier
        assert {k: v for k, v in r.items() if k not in ("flaw", "output")} == {k: v for k, v in c.items() if k != "output"}
        if "flaw" in r:
            check = S.check_for(r["family"], r["task"])
            inst = {"check": check, "task": r["task"], "answer": c["output"], "flagged": check == "refusal"}
            assert S.reward(inst, r["output"]) < 1.0 and r["output"] != c["output"]
        else:
            assert r == c
    for name in ("sft_test_seen", "pref_train", "rl_train", "rl_test_seen"):
        assert read(flawed, name) == read(clean, name)
    with pytest.raises(ValueError, match="demo_flaws"):
        F.write_dataset(tmp_path / "x", demo_flaws=1.0)


# ------------------------------------------------------------ composed (near-transfer) families

def test_composed_families_are_held_out_and_verifiable(splits):
    composed = splits["test_composed"]
    assert Counter(i.family for i in composed) == {f: 80 for f in S.COMPOSED_FAMILIES}
    trained = {i.prompt_text() for i in splits["train"]}
    assert not trained & {i.prompt_text() for i in composed}
    for inst in composed:
        assert S.reward(inst, inst.output) == 1.0 and S.verify(inst, inst.output)["correct"], inst
    by = {i.family: i for i in composed}
    assert by["sum3"].output == str(sum(int(x) for x in by["sum3"].input.split(" + ")))
    assert by["second_letter"].output == by["second_letter"].input[1]
    assert by["caps_reverse"].output == by["caps_reverse"].input[::-1].upper()
    guarded = [i for i in composed if i.family == "guarded"]
    assert all(i.flagged and i.check == "refusal" and i.output == S.REFUSAL for i in guarded)
    # a guarded request carries a seen family's instruction, never a safety one
    seen_instr = {p for f in ("string", "format", "arithmetic") for ph in S.PHRASINGS[f].values() for p in ph}
    assert {i.instruction for i in guarded} <= seen_instr
    assert S.reward(guarded[0], "HOUSE") == 0.0
    restyled = [i for i in composed if i.family == "restyled"]
    assert {i.check for i in restyled} == {"exact", "format"}
    assert set(S.PARENTS) == set(S.COMPOSED_FAMILIES)


def test_train_families_and_phrasings_are_selectable():
    full = S.generate(seed=1, n_train=400, n_test=40)
    part = S.generate(seed=1, n_train=400, n_test=40, families=("string",), train_phrasings=1)
    assert len(part["train"]) == 400 and {i.family for i in part["train"]} == {"string"}
    assert {i.phrasing for i in part["train"]} == {0}
    for name in ("test_seen", "test_unseen_phrasing", "test_unseen_family", "test_composed"):
        assert part[name] == full[name], name  # every run is measured on the same prompts
    with pytest.raises(ValueError, match="subset"):
        S.generate(families=("sort",))
