"""Balancing sequences by token count: over data-parallel ranks, and into token-budget micro-batches.

Both use the Karmarkar-Karp largest differencing method (as verl's seqlen balancing and slime's
--balance-data do): every item starts as a k-way partial partition; the two partial partitions with the
largest spread (heaviest part minus lightest) are merged, heaviest part with lightest, until one is left.
It leaves far smaller spreads than greedy longest-first on the skewed length lists rollouts produce.

- Ranks (`equal_size=True`): every rank must get the same number of rows (DeepSpeed's batch arithmetic
  and `WorkerGroup.submit_sharded` need it), so items enter in groups of k, one per part.
- Micro-batches (`token_micro_batches`): the fewest parts whose tokens each fit the budget, a row longer
  than the budget alone in its part. Ranks then agree on the largest count (`agree` is the all-reduce),
  since every rank must run the same number of forwards under ZeRO (each forward gathers parameters,
  each backward reduces gradients, collectively).

Pure: lists of ints in, lists of index lists out; deterministic (ties broken by index).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable


def karmarkar_karp(weights: list[int], k: int, equal_size: bool = False) -> list[list[int]]:
    """Indices of `weights` in k parts with sums as even as KK makes them; each part's indices ascending.
    equal_size: every part gets len(weights) / k items (which must divide)."""
    n = len(weights)
    if k < 1:
        raise ValueError(f"k={k}: need at least one part")
    if equal_size and n % k:
        raise ValueError(f"{n} items do not split into {k} equal parts")
    order = sorted(range(n), key=lambda i: (weights[i], i))
    # a partial partition: k (sum, items) parts, kept heaviest first
    groups = ([order[g:g + k] for g in range(0, n, k)] if equal_size else [[i] for i in order])
    heap = []
    for tie, group in enumerate(groups):
        parts = [(weights[i], [i]) for i in group] + [(0, []) for _ in range(k - len(group))]
        parts.sort(key=lambda p: -p[0])
        heapq.heappush(heap, (-(parts[0][0] - parts[-1][0]), tie, parts))
    tie = len(groups)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # heaviest of one with lightest of the other
        merged = [(a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)]
        merged.sort(key=lambda p: -p[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    parts = heap[0][2] if heap else [(0, []) for _ in range(k)]
    return sorted((sorted(items) for _, items in parts), key=lambda p: p[0] if p else n)


def fits(weights: list[int], parts: list[list[int]], budget: int) -> bool:
    """Every part within the budget, or a single item (an item longer than the budget goes alone)."""
    return all(len(p) <= 1 or sum(weights[i] for i in p) <= budget for p in parts)


def token_micro_batches(weights: list[int], budget: int,
                        agree: Callable[[int], int] = lambda k: k) -> list[list[int]]:
    """Rows (indices of `weights`, their token counts) in as few micro-batches as fit `budget` tokens
    each, balanced by KK. `agree(k) -> K`: the largest k over ranks (identity on one rank); the count is
    raised until every rank's parts fit at the agreed K, so all ranks end with the same number of parts
    (at most the row count, which is the same on every rank)."""
    n = len(weights)
    if not n:
        return []
    # a lower bound: rows over the budget alone, the rest at least ceil(tokens / budget) parts
    over = sum(w > budget for w in weights)
    first = max(1, min(n, over + math.ceil(sum(w for w in weights if w <= budget) / budget)))
    agreed = 0
    while True:  # the agreed count is the same on every rank, so every rank leaves this loop together
        k = max(first, min(agreed, n))
        while k < n and not fits(weights, karmarkar_karp(weights, k), budget):
            k += 1
        now = agree(k)
        if now == agreed:
            break
        agreed = now
    return nonempty(karmarkar_karp(weights, min(agreed, n)))


def nonempty(parts: list[list[int]]) -> list[list[int]]:
    """KK can leave a part empty when a few rows dominate; a rank must still run exactly k forwards,
    so an empty part takes the last row of the fullest one."""
    parts = [list(p) for p in parts]
    for p in parts:
        if not p:
            donor = max(parts, key=len)
            p.append(donor.pop())
    return parts


def rank_order(weights: list[int], ranks: int) -> list[int]:
    """A permutation of the rows whose `ranks` contiguous equal shares carry near-equal weight: rank r
    gets rows order[r * n / ranks:(r + 1) * n / ranks]."""
    return [i for part in karmarkar_karp(weights, ranks, equal_size=True) for i in part]
