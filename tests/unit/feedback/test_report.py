"""The report's statistics against hand-computed cases, and the report over a store."""

import math

import pytest

from rlhf_system.feedback.report import (
    binomial_p,
    bradley_terry,
    cohen_kappa,
    elo,
    krippendorff_alpha,
    make_report,
    markdown,
    write_report,
)


def test_cohen_kappa_by_hand():
    # observed 3/4; chance (2/4 * 1/4) + (2/4 * 3/4) = 1/2 -> kappa 1/2
    assert cohen_kappa(list("aabb"), list("abbb")) == pytest.approx(0.5)
    assert cohen_kappa(list("abab"), list("abab")) == pytest.approx(1.0)
    assert cohen_kappa(list("aaaa"), list("aaaa")) is None  # no variation: kappa undefined


def test_krippendorff_alpha_by_hand():
    # Units (a,a) (a,b) (b,b): coincidences o_aa = 2, o_bb = 2, o_ab = o_ba = 1; n_a = n_b = 3, n = 6.
    # D_o = 2/6; D_e = 2*3*3/(6*5) = 0.6; alpha = 1 - (1/3)/0.6 = 4/9.
    assert krippendorff_alpha([["a", "a"], ["a", "b"], ["b", "b"]]) == pytest.approx(4 / 9)
    assert krippendorff_alpha([["a", "a", "a"], ["b", "b"], ["c"]]) == pytest.approx(1.0)
    assert krippendorff_alpha([["a"], ["b"]]) is None  # no unit with two labels


def test_bradley_terry_recovers_the_strength_ratio():
    # m1 beats m2 in 3 of 4 games: with no prior the MLE ratio p1/p2 is 3.
    outcomes = [("m1", "m2", 1.0)] * 3 + [("m2", "m1", 1.0)]
    bt = bradley_terry(outcomes, prior=0.0)
    assert bt["m1"] - bt["m2"] == pytest.approx(math.log(3), abs=1e-6)
    assert bt["m1"] + bt["m2"] == pytest.approx(0.0, abs=1e-9)
    unbeaten = bradley_terry([("a", "b", 1.0)] * 5)  # the prior keeps a never-beaten model finite
    assert math.isfinite(unbeaten["a"]) and unbeaten["a"] > unbeaten["b"]


def test_elo_moves_by_k_over_two_on_a_first_win():
    r = elo([("a", "b", 1.0)], k=16)
    assert r["a"] == pytest.approx(1008) and r["b"] == pytest.approx(992)


def test_binomial_p_two_sided():
    assert binomial_p(5, 10) == pytest.approx(1.0)
    assert binomial_p(10, 10) == pytest.approx(2 / 1024)
    assert binomial_p(0, 0) == 1.0


def test_report_over_a_store(tmp_path, store):
    from rlhf_system.feedback.app import VoteIn, normalise, shown_order

    def vote(name, task, **fields):
        shown = shown_order(name, task)
        store.record(name, normalise(VoteIn(vote_id=f"{name}{task.id}", task_id=task.id, shown=shown, seconds=1.0 if
                                            name == "fast" else 9.0, **fields), task, shown))

    for name in ("alice", "bob", "fast"):  # all agree: sft wins t000-t002, t003 is a tie
        for i in range(3):
            t = store.task(f"t{i:03d}")
            sft_left = t.responses[shown_order(name, t)[0]].model == "sft"
            vote(name, t, choice="A" if sft_left else "B", strength="clearly")
        vote(name, store.task("t003"), choice="tie")
    r = make_report(store, bootstrap_rounds=50)
    assert r["votes"] == 12 and r["agreement"]["krippendorff_alpha"] == pytest.approx(1.0)
    assert r["agreement"]["mean_kappa"] == pytest.approx(1.0)
    assert r["models"]["sft"]["win_rate"] == pytest.approx(3.5 / 4) and r["models"]["base"]["win_rate"] == \
        pytest.approx(0.5 / 4)
    low, high = r["models"]["sft"]["bradley_terry_ci"]
    assert low <= r["models"]["sft"]["bradley_terry"] <= high and r["models"]["sft"]["elo"] > 1000
    assert r["annotator_speed"]["fast"]["too_fast"] and not r["annotator_speed"]["alice"]["too_fast"]
    assert r["position_bias"]["decisive_pairwise_votes"] == 9
    out = write_report(r, tmp_path / "report")
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "models.png", "speed.png"}
    assert "| sft | 12 | 0.875 |" in markdown(r)
