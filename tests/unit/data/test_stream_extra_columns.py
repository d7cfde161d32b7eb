"""Streamed data with extra columns (issue 26): real files carry ids, sources, scores beside the format's
keys, and JSONL rows need not agree on them. Every streamed kind (SFT packed or not, preference, prompt)
keeps only its own columns and gives the samples the in-memory build gives; the position still resumes."""

import json

import pytest

from rlhf_system.config import DataConfig, DataSource
from rlhf_system.data.build import build_dataset
from rlhf_system.data.stream import RankStream
from tests.untidy import extras


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_rows(n=60):
    return [{"instruction": "Add the two numbers.", "input": f"{i} + 1", "output": str(i + 1), **extras(i)}
            for i in range(n)]


def built(kind, path, **kw):
    c = DataConfig(train=[DataSource(path=path)], **kw)
    ds, _ = build_dataset(kind, c, c.train, TOK[0])
    return ds


TOK = []


@pytest.fixture(autouse=True)
def tokenizer(bpe_tokenizer):
    TOK[:] = [bpe_tokenizer]


@pytest.mark.parametrize("packing", [False, True])
def test_streamed_sft_equals_in_memory(tmp_path, packing):
    p = write(tmp_path / "sft.jsonl", sft_rows())
    kw = {"packing": packing, "max_len": 96}
    mapped = built("sft", p, **kw)
    streamed = list(built("sft", p, streaming=True, **kw))
    cols = ["input_ids", "loss_mask"] + (["position_ids", "seq_lens"] if packing else [])
    assert sorted(streamed[0]) == sorted(cols)
    assert [{c: r[c] for c in cols} for r in streamed] == [{c: mapped[c][i] for c in cols} for i in range(len(mapped))]


def test_streamed_sft_with_drops_and_packing_resumes(tmp_path):
    """Truncation drops rows (the row count changes inside the batched map) and packing merges them; a
    position saved mid-stream still gives exactly the packs a straight read gives."""
    rows = sft_rows(80)
    for r in rows[5::7]:
        r["output"] = "long " * 200  # over max_len: dropped
    p = write(tmp_path / "sft.jsonl", rows)
    ds = built("sft", p, streaming=True, packing=True, max_len=96, truncation="drop")
    straight = RankStream(ds).take(12)
    first = RankStream(ds)
    head = first.take(5)
    again = RankStream(ds)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + again.take(7) == straight


def test_streamed_preferences_equal_in_memory(tmp_path):
    rows = [{"prompt": f"{i} + 1", "chosen": str(i + 1), "rejected": str(i + 2), **extras(i)} for i in range(40)]
    p = write(tmp_path / "pref.jsonl", rows)
    mapped = built("preference", p)
    streamed = list(built("preference", p, streaming=True))
    assert len(streamed) == len(mapped) == 40
    assert [r["chosen_input_ids"] for r in streamed] == mapped["chosen_input_ids"]
    assert "flaw" not in streamed[1] and "score" not in streamed[2]


def test_streamed_prompts_keep_the_extras_as_meta(tmp_path):
    rows = [{"prompt": f"{i} + 1", "answer": str(i + 1), **extras(i)} for i in range(20)]
    p = write(tmp_path / "rl.jsonl", rows)
    mapped = built("prompt", p)
    streamed = list(built("prompt", p, streaming=True))
    assert [r["prompt_ids"] for r in streamed] == mapped["prompt_ids"]
    # the reward functions read the extra fields from meta: there in both modes (absent keys: null)
    assert json.loads(streamed[1]["meta"])["score"] == 0.5 and json.loads(mapped["meta"][1])["score"] == 0.5
    assert json.loads(streamed[2]["meta"])["meta"] == {"source": "web", "tags": ["a", None]}


def test_a_bad_row_deep_in_the_stream_is_one_line_naming_file_and_line(tmp_path):
    """A row whose value breaks the format (a dict where the format wants text), after rows that built
    fine: our own DataError passes through unwrapped, naming the file and the line. (Building may read
    one map batch ahead, so it can come from build_dataset or from the first take.)"""
    from rlhf_system.data.sources import DataError

    rows = sft_rows(10)
    rows[6]["output"] = {"not": "text"}
    p = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        RankStream(built("sft", p, streaming=True), name=p).take(10)
    assert str(e.value).startswith(f"{p}:7:") and "\n" not in str(e.value)


def test_an_error_raised_inside_the_datasets_pipeline_is_one_line_naming_the_data():
    """A library error mid-stream (here the source's own reader fails after three rows) becomes one
    DataError line that names the data and the way to find the row, not the library's traceback."""
    import datasets

    from rlhf_system.data.sources import DataError

    def rows():
        for i in range(3):
            yield {"x": i}
        raise OSError("connection reset by peer\n  (a long multi-line\n  library message)")

    stream = RankStream(datasets.IterableDataset.from_generator(rows), name="s3://bucket/train.jsonl")
    with pytest.raises(DataError) as e:
        stream.take(5)
    msg = str(e.value)
    assert msg.startswith("s3://bucket/train.jsonl: reading the stream failed") and "\n" not in msg
    assert "OSError: connection reset by peer" in msg and "data.streaming=false" in msg
