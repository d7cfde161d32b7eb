"""Karmarkar-Karp balancing (algorithms/balance.py): ranks get equal rows and near-equal tokens; token-budget
micro-batches fit the budget, cover every row once, and ranks agree on their count."""

import random

import pytest

from rlhf_system.algorithms.balance import fits, karmarkar_karp, rank_order, token_micro_batches


def lengths(n: int, seed: int = 0) -> list[int]:
    r = random.Random(seed)
    # skewed like rollouts: most responses short, a few run to the budget
    return [r.randint(20, 80) + (r.random() < 0.15) * r.randint(300, 600) for _ in range(n)]


def spread(w, parts):
    sums = [sum(w[i] for i in p) for p in parts]
    return max(sums) - min(sums)


def test_equal_size_parts_are_a_partition_with_a_small_spread():
    w = lengths(64)
    parts = karmarkar_karp(w, 4, equal_size=True)
    assert sorted(i for p in parts for i in p) == list(range(64))
    assert [len(p) for p in parts] == [16] * 4
    # contiguous shares (what the ranks got before): 1628 tokens apart of 8866; KK: 122
    contiguous = [list(range(r * 16, (r + 1) * 16)) for r in range(4)]
    assert spread(w, parts) <= 0.02 * sum(w) and spread(w, parts) * 10 < spread(w, contiguous)


def test_kk_beats_greedy_longest_first_on_the_textbook_case():
    # greedy longest-first: {8, 5, 4} / {7, 6} = 17 / 13; KK's differencing: 14 / 16 ({8, 6} / {7, 5, 4})
    w = [8, 7, 6, 5, 4]
    parts = karmarkar_karp(w, 2)
    assert sorted(sum(w[i] for i in p) for p in parts) == [14, 16]
    assert sorted(sorted(w[i] for i in p) for p in parts) == [[4, 5, 7], [6, 8]]


def test_uneven_item_count_for_equal_size_is_an_error():
    with pytest.raises(ValueError, match="do not split into 3 equal parts"):
        karmarkar_karp([1, 2, 3, 4], 3, equal_size=True)


def test_rank_order_is_a_permutation_with_balanced_shares():
    w = lengths(32, seed=1)
    order = rank_order(w, 2)
    assert sorted(order) == list(range(32))
    shares = [sum(w[i] for i in order[:16]), sum(w[i] for i in order[16:])]
    assert abs(shares[0] - shares[1]) <= 0.02 * sum(w)  # contiguous halves: 1135 tokens apart


@pytest.mark.parametrize("budget", [100, 512, 2000])
def test_token_micro_batches_fit_the_budget_and_cover_every_row_once(budget):
    w = lengths(48, seed=2)
    parts = token_micro_batches(w, budget)
    assert sorted(i for p in parts for i in p) == list(range(48))
    assert all(p for p in parts)
    assert fits(w, parts, budget)
    # at least the rows over the budget + what the rest need; KK balances rather than bin-packs, so a
    # few more (budget 100: 32 parts where 28 is the bound)
    over = sum(x > budget for x in w)
    need = over + -(-sum(x for x in w if x <= budget) // budget)
    assert need <= len(parts) <= 1.2 * need + 1


def test_a_row_longer_than_the_budget_goes_alone():
    assert sorted(token_micro_batches([5000, 10, 10], 100)) == [[0], [1, 2]]


def test_ranks_agree_on_the_largest_count():
    """Two ranks: one needs 2 micro-batches, the other 5. Both end with 5 (the all-reduce-max is simulated
    by a shared table answered once both ranks asked, the way the collective answers)."""
    w_short, w_long = [30] * 8, [200] * 8
    local = {"a": token_micro_batches(w_short, 150), "b": token_micro_batches(w_long, 450)}
    assert (len(local["a"]), len(local["b"])) == (2, 4)
    # replay each rank's sequence of agree() calls against the other's
    calls = {"a": [], "b": []}

    def run(me, w, budget, other_counts):
        def agree(k):
            calls[me].append(k)
            return max(k, other_counts[len(calls[me]) - 1])
        return token_micro_batches(w, budget, agree)

    # the counts each rank asks with, round by round, when the other answers with its own
    a = run("a", w_short, 150, [4, 4, 4])
    b = run("b", w_long, 450, calls["a"] + [calls["a"][-1]] * 3)
    assert len(a) == len(b) == 4
    assert len(calls["a"]) == len(calls["b"])  # as many collectives on each rank
    assert fits(w_short, a, 150) and fits(w_long, b, 450)
