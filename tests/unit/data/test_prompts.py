"""The PPO controller's prompts, a step at a time: map-style (shuffled per epoch) and streamed, each
resuming from a saved state on exactly the prompts a straight run reads."""

import json

import pytest

from rlhf_system.config import DataConfig, DataSource
from rlhf_system.data.build import build_dataset
from rlhf_system.data.prompts import StepPrompts


def prompt_file(tmp_path, n=10):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"{i} + 1", "answer": str(i + 1), "family": "add"}) + "\n"
                         for i in range(n)))
    return str(p)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_reads_the_prompts_a_straight_run_reads(tmp_path, bpe_tokenizer, streaming):
    c = DataConfig(train=[DataSource(path=prompt_file(tmp_path))], streaming=streaming)
    ds, _ = build_dataset("prompt", c, c.train, bpe_tokenizer, seed=3)
    # 4 prompts a step from 10: the third step starts a second pass (epoch 1, reshuffled for map-style)
    straight = StepPrompts(ds, 4, seed=3, streaming=streaming)
    expected = [[r["meta"]["answer"] for r in straight.next()] for _ in range(6)]
    assert all(len(step) == 4 for step in expected)
    if not streaming:
        assert straight.per_epoch == 2 and expected[0] != expected[2]  # a new epoch's order
    for cut in range(1, 6):
        first = StepPrompts(ds, 4, seed=3, streaming=streaming)
        got = [[r["meta"]["answer"] for r in first.next()] for _ in range(cut)]
        state = json.loads(json.dumps({"step": cut, **first.state_dict()}))  # as the run state stores it
        resumed = StepPrompts(ds, 4, seed=3, streaming=streaming)
        resumed.load_state_dict(state)
        got += [[r["meta"]["answer"] for r in resumed.next()] for _ in range(6 - cut)]
        assert got == expected, cut


def test_rows_carry_what_the_step_needs(tmp_path, bpe_tokenizer):
    c = DataConfig(train=[DataSource(path=prompt_file(tmp_path))], streaming=True, template="plain")
    ds, _ = build_dataset("prompt", c, c.train, bpe_tokenizer)
    row = StepPrompts(ds, 1, seed=0, streaming=True).next()[0]
    assert row["meta"] == {"answer": "1", "family": "add"}
    assert row["messages"] == [{"role": "user", "content": "0 + 1"}]
    assert bpe_tokenizer.decode(row["prompt_ids"]).startswith("0 + 1")
