"""From files on disk to tokenised datasets: every source type, every format, mixing, streaming, cache, errors."""

import json

import datasets
import pytest

from rlhf_system.config import DataConfig, DataSource
from rlhf_system.data.build import build_dataset
from rlhf_system.data.sources import DataError

ALPACA = [{"instruction": "Add the two numbers.", "input": f"{i} + 1", "output": str(i + 1)} for i in range(40)]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(*paths, **kw):
    return DataConfig(train=[DataSource(path=p) for p in paths], **kw)


def decode_trained(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_alpaca_jsonl(tmp_path, bpe_tokenizer):
    p = jsonl(tmp_path / "a.jsonl", ALPACA)
    ds, stats = build_dataset("sft", cfg(p), cfg(p).train, bpe_tokenizer)
    assert stats.formats == {p: "alpaca"} and len(ds) == 40
    assert decode_trained(bpe_tokenizer, ds[3]["input_ids"], ds[3]["loss_mask"]) == "4<|im_end|>"
    assert "Add the two numbers.\n\n3 + 1" in bpe_tokenizer.decode(ds[3]["input_ids"])


def test_messages_parquet_and_save_to_disk(tmp_path, bpe_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "cat"}, {"role": "assistant", "content": "tac"}]}] * 5
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "m.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "disk"))
    for path in (str(tmp_path / "m.parquet"), str(tmp_path / "disk")):
        ds, stats = build_dataset("sft", cfg(path), cfg(path).train, bpe_tokenizer)
        assert stats.formats[path] == "messages" and len(ds) == 5
        assert decode_trained(bpe_tokenizer, ds[0]["input_ids"], ds[0]["loss_mask"]) == \
            "hello<|im_end|>tac<|im_end|>"


def test_prompt_response_json_array(tmp_path, bpe_tokenizer):
    p = tmp_path / "pr.json"
    p.write_text(json.dumps([{"prompt": "7 + 5", "response": "12"}] * 3))
    ds, stats = build_dataset("sft", cfg(str(p)), cfg(str(p)).train, bpe_tokenizer)
    assert stats.formats[str(p)] == "prompt_response" and len(ds) == 3


def test_preference_formats(tmp_path, bpe_tokenizer):
    pair = jsonl(tmp_path / "p.jsonl", [{"prompt": "7 + 5", "chosen": "12", "rejected": "13"}] * 2)
    hh = jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                        "rejected": "\n\nHuman: hi\n\nAssistant: go away"}] * 2)
    rank = jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 2, 3]}])
    c = cfg(pair, hh, rank, mix_stopping="all_exhausted")
    for src in c.train:
        ds, stats = build_dataset("preference", c, [src], bpe_tokenizer)
        row = ds[0]
        assert set(ds.column_names) == {"chosen_input_ids", "chosen_loss_mask", "rejected_input_ids",
                                        "rejected_loss_mask"}
        assert row["chosen_input_ids"] != row["rejected_input_ids"]
    assert stats.formats[rank] == "ranking" and len(ds) == 3  # 3 responses -> 3 ordered pairs
    ds, stats = build_dataset("preference", c, c.train[1:2], bpe_tokenizer)
    assert stats.formats[hh] == "transcript_pairwise"
    assert decode_trained(bpe_tokenizer, ds[0]["chosen_input_ids"], ds[0]["chosen_loss_mask"]) == "hello<|im_end|>"
    assert decode_trained(bpe_tokenizer, ds[0]["rejected_input_ids"], ds[0]["rejected_loss_mask"]) == \
        "go away<|im_end|>"


def test_identical_pairs_are_dropped_and_counted(tmp_path, bpe_tokenizer):
    rows = [{"prompt": f"{i} + 1", "chosen": str(i + 1), "rejected": str(i + 1) if i % 4 == 0 else "x"}
            for i in range(40)]
    p = jsonl(tmp_path / "p.jsonl", rows)
    for streaming in (False, True):
        ds, stats = build_dataset("preference", cfg(p, streaming=streaming), cfg(p).train, bpe_tokenizer)
        got = list(ds)
        assert len(got) == 30 and all(r["chosen_input_ids"] != r["rejected_input_ids"] for r in got)
        assert set(got[0]) == {"chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"}
        assert stats.identical_pairs == ({} if streaming else {p: 10})  # a stream is not read ahead to count


def test_prompt_set_keeps_answer_and_meta(tmp_path, bpe_tokenizer):
    p = jsonl(tmp_path / "rl.jsonl", [{"prompt": "7 + 5", "answer": "12", "family": "arithmetic"}])
    ds, _ = build_dataset("prompt", cfg(p), cfg(p).train, bpe_tokenizer)
    row = ds[0]
    assert row["answer"] == "12" and json.loads(row["meta"]) == {"family": "arithmetic"}
    assert row["prompt"].endswith("<|im_start|>assistant\n")
    assert bpe_tokenizer.decode(row["prompt_ids"]) == row["prompt"]


def test_malformed_jsonl_line(tmp_path, bpe_tokenizer):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"}\n{"prompt": "a", resp\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON line"):
        build_dataset("sft", cfg(str(p)), cfg(str(p)).train, bpe_tokenizer)


def test_missing_key_in_one_row_names_line_and_found_keys(tmp_path, bpe_tokenizer):
    rows = ALPACA[:3] + [{"instruction": "Add the two numbers.", "input": "1 + 1"}]
    p = jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=r"m.jsonl:4: missing key 'output'; keys found: \['input', 'instruction'\]"):
        build_dataset("sft", cfg(p), cfg(p).train, bpe_tokenizer)


def test_undetectable_format_lists_keys(tmp_path, bpe_tokenizer):
    p = jsonl(tmp_path / "u.jsonl", [{"question": "a", "reply": "b"}])
    with pytest.raises(DataError, match=r"u.jsonl: cannot detect a sft format: found keys: question, reply"):
        build_dataset("sft", cfg(p), cfg(p).train, bpe_tokenizer)


def test_empty_after_filtering(tmp_path, bpe_tokenizer):
    p = jsonl(tmp_path / "long.jsonl", ALPACA[:5])
    c = cfg(p, max_len=8, max_prompt_len=4, truncation="drop")
    with pytest.raises(DataError, match=r"long.jsonl: empty after filtering: all 5 rows were dropped"):
        build_dataset("sft", c, c.train, bpe_tokenizer)


def test_bad_file_type_and_missing_path(tmp_path, bpe_tokenizer):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        build_dataset("sft", cfg(str(tmp_path / "x.csv")), cfg(str(tmp_path / "x.csv")).train, bpe_tokenizer)
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        build_dataset("sft", cfg("nope.jsonl"), cfg("nope.jsonl").train, bpe_tokenizer)


def test_mixing_follows_weights(tmp_path, bpe_tokenizer):
    a = jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "response": "x"}] * 300)
    b = jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "response": "y"}] * 300)
    c = DataConfig(train=[DataSource(path=a, weight=3), DataSource(path=b, weight=1)], mix_stopping="first_exhausted")
    ds, _ = build_dataset("sft", c, c.train, bpe_tokenizer, seed=1)
    from_a = sum("x" in bpe_tokenizer.decode(r) for r in ds["input_ids"])
    assert 0.65 < from_a / len(ds) < 0.85


def test_streaming_gives_the_same_samples(tmp_path, bpe_tokenizer):
    p = jsonl(tmp_path / "a.jsonl", ALPACA)
    mapped, _ = build_dataset("sft", cfg(p), cfg(p).train, bpe_tokenizer)
    streamed, _ = build_dataset("sft", cfg(p, streaming=True), cfg(p).train, bpe_tokenizer)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [r["input_ids"] for r in streamed] == mapped["input_ids"]


def test_tokenisation_is_cached_and_keyed_on_settings(tmp_path, bpe_tokenizer):
    p = jsonl(tmp_path / "a.jsonl", ALPACA)
    c = cfg(p, cache_dir=str(tmp_path / "cache"))
    first, _ = build_dataset("sft", c, c.train, bpe_tokenizer)
    again, _ = build_dataset("sft", c, c.train, bpe_tokenizer)
    other, _ = build_dataset("sft", cfg(p, cache_dir=str(tmp_path / "cache"), max_len=64), c.train, bpe_tokenizer)
    assert first.cache_files and first.cache_files == again.cache_files
    assert other.cache_files != first.cache_files


def test_packing_through_build(tmp_path, bpe_tokenizer):
    p = jsonl(tmp_path / "a.jsonl", ALPACA)
    c = cfg(p, packing=True, max_len=64)
    packed, _ = build_dataset("sft", c, c.train, bpe_tokenizer)
    plain, _ = build_dataset("sft", cfg(p), cfg(p).train, bpe_tokenizer)
    assert len(packed) < len(plain)
    assert sum(sum(r) for r in packed["seq_lens"]) == sum(len(r) for r in plain["input_ids"])
    for row in packed:
        assert len(row["input_ids"]) == sum(row["seq_lens"]) <= 64
        assert row["position_ids"].count(0) == len(row["seq_lens"])


def test_long_rl_prompts_truncated_from_the_left_or_dropped(tmp_path, bpe_tokenizer):
    """RL prompts longer than data.max_prompt_len keep their end (the question and the generation
    prompt), or are dropped with truncation=drop; none is ever longer than the limit."""
    p = jsonl(tmp_path / "rl.jsonl", [{"prompt": "word " * 200 + "3 + 4", "answer": "7"},
                                      {"prompt": "5 + 5", "answer": "10"}])
    kept, _ = build_dataset("prompt", cfg(p, max_len=64, max_prompt_len=24, truncation="left"), cfg(p).train,
                            bpe_tokenizer)
    assert len(kept) == 2 and all(len(r["prompt_ids"]) <= 24 for r in kept)
    assert kept[0]["prompt"].endswith("3 + 4<|im_end|>\n<|im_start|>assistant\n") and kept[0]["answer"] == "7"
    dropped, _ = build_dataset("prompt", cfg(p, max_len=64, max_prompt_len=24, truncation="drop"), cfg(p).train,
                               bpe_tokenizer)
    assert [r["answer"] for r in dropped] == ["10"]
