"""Loss masks, checked token by token, and truncation policies."""

import pytest

from rlhf_system.data.sources import DataError
from rlhf_system.data.tokenize import check_template, encode_with_mask, truncate

S, E = "<|im_start|>", "<|im_end|>"


def tokens(tok, ids):
    return [tok.decode([i]) for i in ids]


def test_single_turn_mask_by_hand(char_tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = encode_with_mask(char_tokenizer, msgs, "chat", 0, "s0")
    got = list(zip(tokens(char_tokenizer, ids), mask))
    want = ([(S, 0)] + [(c, 0) for c in "user\nhi"] + [(E, 0), ("\n", 0), (S, 0)]
            + [(c, 0) for c in "assistant\n"] + [("y", 1), ("o", 1), (E, 1), ("\n", 0)])
    assert got == want


def test_multi_turn_every_assistant_turn_masked(char_tokenizer):
    msgs = [{"role": "system", "content": "be"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    ids, mask = encode_with_mask(char_tokenizer, msgs, "chat", 0, "s0")
    trained = [t for t, m in zip(tokens(char_tokenizer, ids), mask) if m]
    assert trained == ["b", E, "d", E]
    # Position by position: the two trained runs sit right after each "assistant\n" header.
    text = "".join(tokens(char_tokenizer, ids))
    assert text == (f"{S}system\nbe{E}\n{S}user\na{E}\n{S}assistant\nb{E}\n{S}user\nc{E}\n{S}assistant\nd{E}\n")
    starts = [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
    assert [tokens(char_tokenizer, ids[s - 10:s]) for s in starts] == [list("assistant\n")] * 2


def test_train_from_skips_prompt_turns(char_tokenizer):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, mask = encode_with_mask(char_tokenizer, msgs, "chat", 3, "s0")
    assert [t for t, m in zip(tokens(char_tokenizer, ids), mask) if m] == ["d", E]


def test_mask_matches_transformers_generation_mask(bpe_tokenizer):
    """An independent implementation: transformers' {% generation %} assistant mask, on real BPE merges."""
    msgs = [{"role": "user", "content": "Add the two numbers.\n\n7 + 5"}, {"role": "assistant", "content": "12"},
            {"role": "user", "content": "Reverse the word.\n\ncat"}, {"role": "assistant", "content": "tac"}]
    ids, mask = encode_with_mask(bpe_tokenizer, msgs, "chat", 0, "s0")
    ref = bpe_tokenizer.apply_chat_template(msgs, return_assistant_tokens_mask=True, return_dict=True)
    assert ids == list(ref["input_ids"])
    assert mask == list(ref["assistant_masks"])


def test_plain_template_mask(char_tokenizer):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"}]
    ids, mask = encode_with_mask(char_tokenizer, msgs, "plain", 0, "s0")
    assert list(zip(tokens(char_tokenizer, ids), mask)) == [("q", 0), ("\n", 0), ("a", 1), ("b", 1), (E, 1)]


def test_all_zero_mask_is_an_error(char_tokenizer):
    # A template that drops assistant content: the silent failure other libraries train through.
    broken = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{% endif %}")
    original = char_tokenizer.chat_template
    char_tokenizer.chat_template = broken
    try:
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        with pytest.raises(DataError, match="sample 7: the chat template yields an all-zero loss mask"):
            encode_with_mask(char_tokenizer, msgs, "chat", 0, "sample 7")
    finally:
        char_tokenizer.chat_template = original


def test_missing_chat_template(char_tokenizer):
    original = char_tokenizer.chat_template
    char_tokenizer.chat_template = None
    try:
        with pytest.raises(DataError, match="tok/path: the tokenizer has no chat template"):
            check_template(char_tokenizer, "chat", "tok/path")
        check_template(char_tokenizer, "plain", "tok/path")  # plain needs none
    finally:
        char_tokenizer.chat_template = original


@pytest.mark.parametrize("policy,want", [
    ("drop", None),
    ("right", ([1, 2, 3, 4, 5], [0, 0, 0, 1, 1])),
    ("left", ([3, 4, 5, 6, 7], [0, 1, 1, 1, 1])),
])
def test_truncation_policies(policy, want):
    ids, mask = [1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 1, 1, 1, 1]
    assert truncate(ids, mask, 5, policy) == want


def test_truncation_left_keeps_response_and_cuts_its_end_when_too_long():
    ids, mask = [1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 1, 1]
    assert truncate(ids, mask, 3, "left") == ([3, 4, 5], [1, 1, 1])


def test_truncation_that_removes_every_trained_token_drops():
    assert truncate([1, 2, 3, 4], [0, 0, 0, 1], 3, "right") is None
    assert truncate([1, 2], [0, 1], 5, "right") == ([1, 2], [0, 1])
