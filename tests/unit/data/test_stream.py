"""Streaming (`data.streaming=true`): per-rank shares, a position that resumes on exactly the samples a
straight read would give, mixing weights, and bad lines named as file:line."""

import json
from collections import Counter

import datasets
import pytest

from rlhf_system.config import DataConfig, DataSource
from rlhf_system.data.build import build_dataset
from rlhf_system.data.sources import DataError
from rlhf_system.data.stream import RankStream


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def two_sources(tmp_path, n=30):
    a = jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "response": "x"} for i in range(n)])
    b = jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "response": "y"} for i in range(n)])
    return DataConfig(train=[DataSource(path=a, weight=3), DataSource(path=b, weight=1)], streaming=True)


def key(row):
    return tuple(row["input_ids"])


def test_build_is_iterable_without_length(tmp_path, bpe_tokenizer):
    c = two_sources(tmp_path)
    ds, _ = build_dataset("sft", c, c.train, bpe_tokenizer, seed=1)
    assert isinstance(ds, datasets.IterableDataset)
    with pytest.raises(TypeError):
        len(ds)


@pytest.mark.parametrize("world", [1, 2])
def test_resume_mid_stream_gives_the_samples_a_straight_read_gives(tmp_path, bpe_tokenizer, world):
    c = two_sources(tmp_path, n=12)
    ds, _ = build_dataset("sft", c, c.train, bpe_tokenizer, seed=1)
    for rank in range(world):
        # 5 takes of 7 cross the end of the share (a second pass starts), with a save after each take.
        straight = RankStream(ds, rank, world)
        expected = [[key(r) for r in straight.take(7)] for _ in range(5)]
        straight.close()
        for cut in range(1, 5):
            first = RankStream(ds, rank, world)
            got = [[key(r) for r in first.take(7)] for _ in range(cut)]
            state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint writes and reads
            first.close()  # as the saving process ends: its prefetch threads stop touching the shared source
            resumed = RankStream(ds, rank, world)
            resumed.load_state_dict(state)
            assert resumed.state_dict() == state  # saved again before reading: the same position
            got += [[key(r) for r in resumed.take(7)] for _ in range(5 - cut)]
            resumed.close()
            assert got == expected, (rank, cut)


def test_ranks_split_one_pass_between_them(tmp_path, bpe_tokenizer):
    c = two_sources(tmp_path, n=12)  # mixed until both are exhausted: the first one's rows repeat
    ds, _ = build_dataset("sft", c, c.train, bpe_tokenizer, seed=1)
    one_pass = [key(r) for r in ds]
    shares = [[key(r) for r in RankStream(ds, r, 2).take(len(one_pass) // 2)] for r in range(2)]
    assert Counter(shares[0]) + Counter(shares[1]) == Counter(one_pass)
    single = DataConfig(train=c.train[:1], streaming=True)
    ds, _ = build_dataset("sft", single, single.train, bpe_tokenizer)
    shares = [{key(r) for r in RankStream(ds, r, 2).take(6)} for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 6 and not shares[0] & shares[1]


def test_mixing_weights_kept_when_streaming(tmp_path, bpe_tokenizer):
    c = two_sources(tmp_path, n=300)
    c.mix_stopping = "first_exhausted"
    ds, _ = build_dataset("sft", c, c.train, bpe_tokenizer, seed=1)
    rows = RankStream(ds).take(200)
    from_a = sum("x" in bpe_tokenizer.decode(r["input_ids"]) for r in rows)
    assert 0.65 < from_a / len(rows) < 0.85


def test_bad_line_deep_in_a_stream_names_file_and_line(tmp_path, bpe_tokenizer):
    p = tmp_path / "s.jsonl"
    good = [json.dumps({"prompt": f"q{i}", "response": "r"}) for i in range(600)]
    p.write_text("\n".join(good[:399] + ['{"prompt": "q", "response": '] + good[399:]) + "\n")
    c = DataConfig(train=[DataSource(path=str(p))], streaming=True)
    # Building reads (and tokenises) one map batch ahead, which is fine here: the error comes while training.
    ds, _ = build_dataset("sft", c, c.train, bpe_tokenizer)
    with pytest.raises(DataError, match=r"s\.jsonl:400: malformed JSON line"):
        RankStream(ds).take(600)


def test_bad_row_in_a_stream_names_file_and_line(tmp_path, bpe_tokenizer):
    rows = [{"prompt": f"q{i}", "response": "r"} for i in range(600)]
    rows[412] = {"prompt": "q", "response": 7}
    c = DataConfig(train=[DataSource(path=jsonl(tmp_path / "t.jsonl", rows))], streaming=True)
    ds, _ = build_dataset("sft", c, c.train, bpe_tokenizer)
    with pytest.raises(DataError, match=r"t\.jsonl:413: key 'response' must be a string"):
        RankStream(ds).take(600)


def test_empty_stream_is_a_data_error(tmp_path, bpe_tokenizer):
    (tmp_path / "e.jsonl").write_text("")
    c = DataConfig(train=[DataSource(path=str(tmp_path / "e.jsonl"))], streaming=True)
    with pytest.raises(DataError, match="e.jsonl: no rows"):
        build_dataset("sft", c, c.train, bpe_tokenizer)
