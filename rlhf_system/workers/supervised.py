"""The loops the supervised workers (SFT, reward model, DPO) share, so that each keeps only its loss.

    sums = optimizer_step(engine, items, loss_of, scale, "SFT", step, rank)     # one global batch
    sums = strided_sums(engine, strided_shares(n, mb, rank, world), score, width)  # held-out set

Both return float64 sums reduced over the ranks, for the worker to divide by what it counts (tokens,
pairs). `optimizer_step` scales each micro-batch's summed loss by `scale` before the backward pass: the
workers pass gas * world / (the global batch's count), which undoes DeepSpeed's division by the
accumulation steps and its mean over ranks, leaving sum(loss) / count. A non-finite loss stops the run
naming the step, the rank and the micro-batch's rows.

Evaluation is strided: rank r takes micro-batches r, r + world, ... of [0, n). Every rank runs the same
number of forwards (a rank past the end scores sample 0 and discards it): under ZeRO-3 each forward is
a collective, and unequal counts would hang.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_system.distributed.devices import all_reduce_sum


def optimizer_step(engine, items: list[tuple[str, object]], loss_of: Callable, scale: float | torch.Tensor,
                   what: str, step: int, rank: int) -> torch.Tensor:
    """`items`: (where, payload) per micro-batch of this rank; `loss_of(payload) -> (loss summed over the
    micro-batch, with grad; detached sums to report)`. DeepSpeed steps once the accumulation ends."""
    total = None
    for where, payload in items:
        loss, sums = loss_of(payload)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {what} loss at step {step}, rank {rank}, {where}: {loss.item()}. "
                                     "Fix: lower optim.lr or check the data")
        engine.backward(loss * scale)
        engine.step()
        sums = sums.detach().double().cpu().reshape(-1)
        total = sums if total is None else total + sums
    return all_reduce_sum(total, engine.device)


def grad_norm_of(engine) -> dict:
    """{"grad_norm": ...} before clipping, where the engine reports one (ZeRO 1-3 do, stage 0 does not)."""
    norm = engine.get_global_grad_norm()
    return {} if norm is None else {"grad_norm": float(norm)}


def eval_size(cfg, n: int) -> int:
    """The held-out samples evaluated: all n, or train.max_eval_samples of them."""
    return min(n, cfg.train.max_eval_samples) if cfg.train.max_eval_samples else n


def strided_shares(n: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of indices [0, n), strided over ranks; the same count on every rank (a
    rank past the end gets empty lists)."""
    rounds = -(-n // (micro * world))
    starts = [(k * world + rank) * micro for k in range(rounds)]
    return [list(range(s, min(s + micro, n))) for s in starts]


def strided_sums(engine, shares: list[list[int]], score: Callable[[list[int]], torch.Tensor], width: int) -> torch.Tensor:
    """Sum of `score(indices) -> (width,)` over this rank's shares, reduced over ranks; an empty share is
    scored on sample 0 (the collective forward every rank must make) and left out."""
    sums = torch.zeros(width, dtype=torch.float64)
    with torch.no_grad():
        for idx in shares:
            got = score(idx or [0])
            if idx:
                sums += got.detach().double().cpu().reshape(-1)
    return all_reduce_sum(sums, engine.device)
