"""Which samples go into which optimiser step, and onto which rank: shared by every trainer.

The controller shuffles sample indices per epoch with `seed + epoch` and cuts them into global
batches; rank r of a data-parallel group takes the r-th contiguous share and cuts it into
micro-batches. The global batch is the same whatever the number of ranks or the micro-batch size,
which is what makes 1-process and N-process runs (and any accumulation split) give the same update.
"""

from __future__ import annotations

import torch


def global_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled sample indices grouped into global batches (the last incomplete one is dropped)."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]


def rank_micro_batches(batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    per_rank = len(batch) // world
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro] for i in range(0, per_rank, micro)]


def steps_per_run(n_train: int, global_batch: int, epochs: int, max_steps: int) -> int:
    """Optimiser steps of a run; 0 when the data is smaller than one global batch."""
    total = (n_train // global_batch) * epochs
    return min(total, max_steps) if max_steps > 0 else total


def checked_total_steps(cfg, n_train: int | None, unit: str, identical: dict[str, int] | None = None) -> int:
    """`steps_per_run` for a run config; a dataset smaller than one global batch is a config error.
    `unit` names what is counted ("samples (packs)", "preference pairs"). A stream (n_train None) has no
    length: its run is train.max_steps long (config_checks requires it). `identical`: preference pairs
    dropped per file because chosen equals rejected after tokenisation, named in that error when they
    are why too few are left."""
    from rlhf_system.config import ConfigError

    t = cfg.train
    if n_train is None:
        return t.max_steps
    total = steps_per_run(n_train, t.global_batch_size, t.epochs, t.max_steps)
    if total == 0:
        why = ""
        if identical:
            path, n = max(identical.items(), key=lambda kv: kv[1])
            why = (f", after {sum(identical.values())} pairs whose chosen equals rejected after tokenisation were "
                   f"dropped ({n} in {path}: identical responses, or responses that differ only where the "
                   "tokenizer or data.max_len cuts them)")
        raise ConfigError(f"data.train has {n_train} {unit}{why}, fewer than train.global_batch_size="
                          f"{t.global_batch_size}. Fix: lower the global batch or add data")
    return total
