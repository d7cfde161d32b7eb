"""Packing boundaries and padding: packed samples must not see each other."""

import pytest
import torch

from rlhf_system.data.collate import (
    collate_flat,
    collate_packed,
    collate_sft,
    pack_samples,
    packed_attention_mask,
    packing_layout,
    pad_to,
)


def s(ids, mask=None):
    return {"input_ids": ids, "loss_mask": mask or [1] * len(ids)}


def test_pack_greedy_in_order():
    packs = pack_samples([s([1, 2, 3]), s([4, 5]), s([6, 7, 8, 9]), s([10])], max_len=5)
    assert [p["input_ids"] for p in packs] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert [p["position_ids"] for p in packs] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert [p["seq_lens"] for p in packs] == [[3, 2], [4, 1]]


def test_pack_keeps_loss_mask_aligned():
    packs = pack_samples([s([1, 2], [0, 1]), s([3, 4, 5], [0, 0, 1])], max_len=8)
    assert packs == [{"input_ids": [1, 2, 3, 4, 5], "loss_mask": [0, 1, 0, 0, 1],
                      "position_ids": [0, 1, 0, 1, 2], "seq_lens": [2, 3]}]


def test_pack_rejects_oversized():
    with pytest.raises(ValueError, match="exceeds the pack length 3"):
        pack_samples([s([1, 2, 3, 4])], 3)


def test_block_diagonal_mask_by_hand():
    m = packed_attention_mask([[2, 1]], 4)[0, 0] == 0  # True = may attend
    assert m.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, False, True, False],   # the second sample starts fresh
        [False, False, False, True],   # padding sees only itself (no all-masked row -> no NaN)
    ]


def test_pad_left_and_right():
    assert pad_to([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad_to([[1, 2], [3]], 0, side="left").tolist() == [[1, 2], [0, 3]]
    b = collate_sft([s([1, 2], [0, 1]), s([3])], pad_id=9)
    assert b["input_ids"].tolist() == [[1, 2], [3, 9]]
    assert b["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert b["loss_mask"].tolist() == [[0, 1], [1, 0]]


def assert_each_sample_solo(model, logits, samples, atol=1e-4, device="cpu"):
    """`logits` (L, V) of a packed row: each sample's slice equals its own forward alone."""
    start = 0
    with torch.no_grad():
        for sample in samples:
            n = len(sample["input_ids"])
            solo = model(input_ids=torch.tensor([sample["input_ids"]], device=device)).logits[0].float()
            torch.testing.assert_close(logits[start:start + n], solo, atol=atol, rtol=atol)
            start += n


def test_packed_forward_equals_separate_forwards(tiny_policy):
    """The real check of the boundaries: a packed forward gives each sample its solo logits."""
    torch.manual_seed(0)
    samples = [s(torch.randint(5, 300, (n,)).tolist()) for n in (7, 5, 9)]
    packs = pack_samples(samples, max_len=24)
    assert len(packs) == 1 and packs[0]["seq_lens"] == [7, 5, 9]
    batch = collate_packed(packs, pad_id=0)
    with torch.no_grad():
        packed = tiny_policy(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             attention_mask=batch["attention_mask"]).logits[0]
    assert_each_sample_solo(tiny_policy, packed, samples)


def test_packing_without_boundaries_would_differ(tiny_policy):
    """Guard against a vacuous pass: plain causal attention over the pack changes the later samples."""
    torch.manual_seed(0)
    a, b = torch.randint(5, 300, (6,)).tolist(), torch.randint(5, 300, (6,)).tolist()
    with torch.no_grad():
        joined = tiny_policy(input_ids=torch.tensor([a + b])).logits[0, 6:]
        solo = tiny_policy(input_ids=torch.tensor([b])).logits[0]
    assert (joined - solo).abs().max() > 1e-3


def test_layout_follows_the_attention_implementation():
    assert packing_layout("flash_attention_2") == "flat"
    assert [packing_layout(a) for a in ("sdpa", "eager", "auto")] == ["mask"] * 3


def test_flat_layout_is_one_row_without_padding_or_mask():
    packs = pack_samples([s([1, 2, 3], [0, 1, 1]), s([4, 5]), s([6, 7, 8, 9])], max_len=6)
    assert [p["seq_lens"] for p in packs] == [[3, 2], [4]]
    b = collate_flat(packs)
    assert set(b) == {"input_ids", "position_ids", "loss_mask"}  # no attention_mask: it would hide the layout
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 1, 1]]


def test_flat_forward_equals_separate_forwards(tiny_policy):
    """The flat layout through transformers' own boundary detection (restarting position ids, no mask):
    on CPU its sdpa path builds the block mask from the position ids, as the FA2 path gets cu_seqlens."""
    torch.manual_seed(1)
    samples = [s(torch.randint(5, 300, (n,)).tolist()) for n in (7, 5, 9, 4)]
    packs = pack_samples(samples, max_len=14)
    assert len(packs) == 2
    batch = collate_flat(packs)
    with torch.no_grad():
        # use_cache=False: transformers looks for packed sequences only without a KV cache (training)
        flat = tiny_policy(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    assert_each_sample_solo(tiny_policy, flat, samples)
