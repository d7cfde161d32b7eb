"""Format detection and row -> canonical record, for every supported format."""

import pytest

from rlhf_system.config import DataKeys
from rlhf_system.data import formats
from rlhf_system.data.sources import DataError

K = DataKeys()
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}


@pytest.mark.parametrize("cols,kind,want", [
    (["prompt", "response"], "sft", "prompt_response"),
    (["instruction", "input", "output"], "sft", "alpaca"),
    (["instruction", "output"], "sft", "alpaca"),
    (["messages", "id"], "sft", "messages"),
    (["prompt", "chosen", "rejected"], "preference", "pairwise"),
    (["chosen", "rejected"], "preference", "pairwise"),
    (["prompt", "responses", "ranks"], "preference", "ranking"),
    (["prompt", "answer"], "prompt", "prompt"),
    (["prompt"], "prompt", "prompt"),
])
def test_detect(cols, kind, want):
    assert formats.detect_format(cols, kind, K, "auto", "f.jsonl", {}) == want


def test_detect_transcript():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    assert formats.detect_format(["chosen", "rejected"], "preference", K, "auto", "f", row) == "transcript_pairwise"


def test_detect_failure_lists_found_keys():
    with pytest.raises(DataError, match=r"f.jsonl: cannot detect a sft format: found keys: q, resp; expected"):
        formats.detect_format(["q", "resp"], "sft", K, "auto", "f.jsonl", {})


def test_explicit_format_missing_key():
    with pytest.raises(DataError, match=r"format 'alpaca' needs key\(s\) \['output'\].*found keys: instruction"):
        formats.detect_format(["instruction"], "sft", K, "alpaca", "f", {})


def test_custom_key_names():
    keys = DataKeys(prompt="question", response="reply")
    assert formats.detect_format(["question", "reply"], "sft", keys, "auto", "f", {}) == "prompt_response"
    rec = formats.to_sft({"question": "q", "reply": "r"}, "prompt_response", keys, "f:1")
    assert rec == {"messages": [U("q"), A("r")]}


def test_sft_records():
    assert formats.to_sft({"instruction": "Add.", "input": "1 + 2", "output": "3"}, "alpaca", K, "f:1") == {
        "messages": [U("Add.\n\n1 + 2"), A("3")]}
    assert formats.to_sft({"instruction": "Hi.", "input": "", "output": "Hello"}, "alpaca", K, "f:1") == {
        "messages": [U("Hi."), A("Hello")]}
    msgs = [U("a"), A("b"), U("c"), A("d")]
    assert formats.to_sft({"messages": msgs}, "messages", K, "f:1", system="sys") == {
        "messages": [{"role": "system", "content": "sys"}] + msgs}


def test_sft_row_errors_name_the_line():
    with pytest.raises(DataError, match=r"f.jsonl:4: missing key 'output'; keys found: \['instruction'\]"):
        formats.to_sft({"instruction": "x", "output": None}, "alpaca", K, "f.jsonl:4")
    with pytest.raises(DataError, match=r"f:2: messages\[1\].role is 'bot'"):
        formats.to_sft({"messages": [U("a"), {"role": "bot", "content": "b"}]}, "messages", K, "f:2")
    with pytest.raises(DataError, match="f:3: no assistant turn"):
        formats.to_sft({"messages": [U("a")]}, "messages", K, "f:3")


def test_pairwise_with_prompt_and_without():
    assert formats.to_preference({"prompt": "q", "chosen": "good", "rejected": "bad"}, "pairwise", K, "f") == [
        {"prompt": [U("q")], "chosen": [A("good")], "rejected": [A("bad")]}]
    assert formats.to_preference({"chosen": "good", "rejected": "bad"}, "pairwise", K, "f") == [
        {"prompt": [], "chosen": [A("good")], "rejected": [A("bad")]}]


def test_pairwise_message_lists_split_at_common_prefix():
    row = {"chosen": [U("a"), A("b"), U("c"), A("good")], "rejected": [U("a"), A("b"), U("c"), A("bad")]}
    assert formats.to_preference(row, "pairwise", K, "f") == [
        {"prompt": [U("a"), A("b"), U("c")], "chosen": [A("good")], "rejected": [A("bad")]}]


def test_ultrafeedback_rows_render_the_user_turn_once():
    """UltraFeedback / HH-as-messages: a `prompt` column beside chosen/rejected conversations that already
    start with the user turn. The prompt is the shared turns, not the column prepended to them again."""
    row = {"prompt": "2+2?", "chosen": [U("2+2?"), A("4")], "rejected": [U("2+2?"), A("5")]}
    assert formats.to_preference(row, "pairwise", K, "f") == [
        {"prompt": [U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]}]
    # chosen/rejected as assistant-only lists still continue the prompt column
    row = {"prompt": "2+2?", "chosen": [A("4")], "rejected": [A("5")]}
    assert formats.to_preference(row, "pairwise", K, "f") == [
        {"prompt": [U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]}]


def test_transcript_pairs():
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: sure",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: no"}
    [pair] = formats.to_preference(row, "transcript_pairwise", K, "f")
    assert pair == {"prompt": [U("hi"), A("hello"), U("help?")], "chosen": [A("sure")], "rejected": [A("no")]}


def test_bad_transcript():
    with pytest.raises(DataError, match="f:9 \\(chosen\\): transcript must start with"):
        formats.to_preference({"chosen": "hello", "rejected": "\n\nHuman: a\n\nAssistant: b"},
                              "transcript_pairwise", K, "f:9")


def test_ranking_expands_into_ordered_pairs():
    row = {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranks": [2, 1, 3, 2]}
    pairs = formats.to_preference(row, "ranking", K, "f")
    got = sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs)
    # b(1) > a(2) = d(2) > c(3); the a/d tie gives no pair: 6 - 1 = 5 pairs.
    assert got == sorted([("b", "a"), ("b", "c"), ("b", "d"), ("a", "c"), ("d", "c")])
    assert all(p["prompt"] == [U("q")] for p in pairs)


def test_ranking_errors():
    with pytest.raises(DataError, match="equal length"):
        formats.to_preference({"prompt": "q", "responses": ["a", "b"], "ranks": [1]}, "ranking", K, "f")
    with pytest.raises(DataError, match="at least 2 responses"):
        formats.to_preference({"prompt": "q", "responses": ["a"], "ranks": [1]}, "ranking", K, "f")


def test_prompt_records():
    assert formats.to_prompt({"prompt": "2+2?", "answer": 4}, "prompt", K, "f") == {
        "prompt": [U("2+2?")], "answer": "4"}
    assert formats.to_prompt({"prompt": [U("hi")]}, "prompt", K, "f") == {"prompt": [U("hi")], "answer": ""}
    with pytest.raises(DataError, match="must not end with an assistant turn"):
        formats.to_prompt({"prompt": [U("hi"), A("x")]}, "prompt", K, "f")
