"""Batching: padding helpers and sequence packing.

Packing puts several samples into one sequence of at most `max_len` tokens. Samples stay apart:
position ids restart at 0 for each one, and the attention sees the boundaries in one of two layouts
(`packing_layout`, from model.attn_implementation):
- "mask" (sdpa, eager: kernels that take a dense mask): packs are rows of a (B, L) batch and
  `packed_attention_mask` builds a (B, 1, L, L) block-diagonal causal mask.
- "flat" (flash_attention_2: its varlen kernel takes no dense mask, and transformers passes the FA2
  path the sequence boundaries it finds where the position ids restart): every pack of the batch is
  concatenated into one (1, N) row without padding or mask, the padding-free layout transformers'
  DataCollatorWithFlattening produces.
A packed forward gives each sample the logits it would get alone in either layout, which
tests/unit/data/test_collate.py checks against a real model (the flat layout through transformers'
own boundary detection on CPU; tests/gpu for FA2).
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


# attention implementations that find sample boundaries from restarting position ids (no dense mask)
FLAT_IMPLEMENTATIONS = ("flash_attention_2",)


def packing_layout(attn_implementation: str) -> str:
    return "flat" if attn_implementation in FLAT_IMPLEMENTATIONS else "mask"


def collate_flat(packs: list[dict]) -> dict[str, torch.Tensor]:
    """Batch of packs as one (1, N) row: input_ids, position_ids (restarting per sample), loss_mask,
    and no attention mask (its absence, with the position ids, tells transformers the layout)."""
    return {
        "input_ids": torch.tensor([[t for p in packs for t in p["input_ids"]]]),
        "position_ids": torch.tensor([[t for p in packs for t in p["position_ids"]]]),
        "loss_mask": torch.tensor([[t for p in packs for t in p["loss_mask"]]]),
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
