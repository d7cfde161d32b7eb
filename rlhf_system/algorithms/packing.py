"""Left-packing the kept tokens of each row, so per-token estimators can run on multi-turn responses.

A multi-turn response interleaves the policy's tokens with the environment's (tool output), which the
mask leaves out. The estimators (advantages.py) assume each row's kept tokens are contiguous from
position 0, and GAE's or REINFORCE++'s discounting should run over the policy's own steps, one action
after another, with the environment's tokens not counted as time steps. So: `pack` moves each row's
kept values to the front, in order; the estimator runs on that; `unpack` puts the results back at the
positions they came from (0 elsewhere). With a mask that is already contiguous from 0 both are the
identity.
"""

from __future__ import annotations

import torch


def _order(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per row, kept positions first (in order), then the rest; and the longest row's kept count."""
    keep = mask.bool()
    # stable sort on "not kept": kept positions keep their order and come first
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    return order, max(1, int(keep.sum(-1).max())) if len(mask) else 1


def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) values and mask -> (B, T') left-packed values (0 past each row's kept count) and their
    contiguous mask."""
    order, width = _order(mask)
    packed_mask = mask.gather(-1, order)[:, :width]
    packed = x.gather(-1, order)[:, :width]
    return torch.where(packed_mask.bool(), packed, torch.zeros((), dtype=x.dtype)), packed_mask


def unpack(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack` on the kept positions: (B, T') -> (B, T), 0 where mask is 0."""
    order, width = _order(mask)
    out = torch.zeros(mask.shape, dtype=packed.dtype)
    out.scatter_(-1, order[:, :width], packed[:, :width])
    return torch.where(mask.bool(), out, torch.zeros((), dtype=packed.dtype))
