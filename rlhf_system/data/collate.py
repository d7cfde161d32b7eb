"""Batching: padding helpers and sequence packing.

Packing puts several samples into one sequence of at most `max_len` tokens. Samples stay apart:
position ids restart at 0 for each one, and `packed_attention_mask` builds a block-diagonal causal
mask so no token attends across a boundary (flash-attention kernels get the same boundaries from
the restarting position ids). A packed forward therefore gives each sample the logits it would
get alone, which tests/unit/data/test_collate.py checks against a real model.
"""

from __future__ import annotations

import torch


def pack_samples(samples: list[dict], max_len: int) -> list[dict]:
    """Greedy, order-preserving packing of {"input_ids", "loss_mask"} samples.

    Returns packs with input_ids, loss_mask, position_ids (restart per sample) and seq_lens.
    Order is kept so that the data order (and resume) stays deterministic.
    """
    packs: list[dict] = []
    cur = None
    for s in samples:
        n = len(s["input_ids"])
        if n > max_len:
            raise ValueError(f"sample of {n} tokens exceeds the pack length {max_len}; truncate first")
        if cur is None or len(cur["input_ids"]) + n > max_len:
            cur = {"input_ids": [], "loss_mask": [], "position_ids": [], "seq_lens": []}
            packs.append(cur)
        cur["input_ids"] += list(s["input_ids"])
        cur["loss_mask"] += list(s["loss_mask"])
        cur["position_ids"] += list(range(n))
        cur["seq_lens"].append(n)
    return packs


def pad_to(seqs: list[list[int]], value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """(B, L) long tensor; `side=left` is for prompts that a model continues."""
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.as_tensor(s, dtype=torch.long)
        if side == "right":
            out[i, : len(s)] = t
        else:
            out[i, length - len(s):] = t
    return out


def collate_sft(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (B, L), loss_mask (B, L)."""
    ids = pad_to([s["input_ids"] for s in samples], pad_id)
    return {
        "input_ids": ids,
        "attention_mask": pad_to([[1] * len(s["input_ids"]) for s in samples], 0),
        "loss_mask": pad_to([s["loss_mask"] for s in samples], 0),
    }


def collate_packed(packs: list[dict], pad_id: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Batch of packs: input_ids, position_ids, loss_mask (B, L) and a (B, 1, L, L) additive mask."""
    length = max(len(p["input_ids"]) for p in packs)
    return {
        "input_ids": pad_to([p["input_ids"] for p in packs], pad_id, length=length),
        "position_ids": pad_to([p["position_ids"] for p in packs], 0, length=length),
        "loss_mask": pad_to([p["loss_mask"] for p in packs], 0, length=length),
        "attention_mask": packed_attention_mask([p["seq_lens"] for p in packs], length, dtype),
    }


def packed_attention_mask(seq_lens: list[list[int]], length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, L, L) additive mask: 0 where query i may attend key j (same sample, j <= i), else -inf.

    Padding positions attend only to themselves so that no row is fully masked (which gives NaN).
    """
    allowed = torch.zeros(len(seq_lens), length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, lens in enumerate(seq_lens):
        start = 0
        for n in lens:
            allowed[b, start:start + n, start:start + n] = causal[:n, :n]
            start += n
        idx = torch.arange(start, length)
        allowed[b, idx, idx] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
