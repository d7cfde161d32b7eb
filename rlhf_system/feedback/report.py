"""`rlhf feedback report`: what the votes say about the annotators and about the models.

    report = make_report(store, bootstrap=200, seed=0)     # a dict; write_report(report, out_dir)

- Agreement: Cohen's kappa for every pair of annotators on the tasks both judged, and Krippendorff's
  alpha (nominal) over all annotators and tasks. The label of a vote is its overall judgement: the
  winning response, tie, or both bad (a ranking vote: its top response).
- Models: each model's win rate (ties count half, both-bad pairs not at all), and a Bradley-Terry and an
  Elo rating, each with a 95% bootstrap interval (votes resampled with replacement), so the same votes
  evaluate the models that made the responses. Ranking votes count as the pairs they imply.
- Checks: position bias (how often the left response wins a decisive pairwise vote, with a two-sided
  binomial p-value against 0.5) and annotator speed (median seconds per vote; under `fast_s` is flagged).

The functions below are pure: lists in, numbers out; tests check them against hand-computed cases.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from statistics import median

from rlhf_system.data.sources import DataError
from rlhf_system.feedback.tasks import Vote


# ----------------------------------------------------------------------------------- agreement
def cohen_kappa(a: list, b: list) -> float | None:
    """Cohen's kappa of two raters' labels on the same items; None when chance agreement is total."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def krippendorff_alpha(units: list[list]) -> float | None:
    """Krippendorff's alpha, nominal, from the labels each unit (item) received; units with fewer than two
    labels do not count. None when there is nothing to disagree on."""
    coincidence: dict[tuple, float] = defaultdict(float)
    for labels in units:
        m = len(labels)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            coincidence[labels[i], labels[j]] += 1 / (m - 1)
    n_c: dict = defaultdict(float)
    for (c, _), v in coincidence.items():
        n_c[c] += v
    n = sum(n_c.values())
    if n <= 1:
        return None
    d_o = sum(v for (c, k), v in coincidence.items() if c != k) / n
    d_e = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n * (n - 1))
    return None if d_e == 0 else 1 - d_o / d_e


# ------------------------------------------------------------------------------------ ratings
def bradley_terry(outcomes: list[tuple[str, str, float]], iters: int = 500, prior: float = 0.5) -> dict[str, float]:
    """Bradley-Terry log-strengths (mean 0) from (model i, model j, score of i: 1 win, 0.5 tie, 0 loss),
    by Hunter's MM updates. `prior` adds that many virtual ties of each model against every other, so a
    model that never lost keeps a finite strength."""
    models = sorted({m for i, j, _ in outcomes for m in (i, j)})
    wins: dict[str, float] = defaultdict(float)
    games: dict[tuple[str, str], float] = defaultdict(float)
    for i, j, s in outcomes:
        wins[i] += s
        wins[j] += 1 - s
        games[i, j] += 1
        games[j, i] += 1
    for i, j in itertools.permutations(models, 2):  # each ordered pair once: `prior` games, half won each way
        wins[i] += prior / 2
        games[i, j] += prior
    p = {m: 1.0 for m in models}
    for _ in range(iters):
        new = {i: wins[i] / sum(games[i, j] / (p[i] + p[j]) for j in models if j != i and games[i, j])
               for i in models if any(games[i, j] for j in models if j != i)}
        total = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        p = {m: v / total for m, v in new.items()}
    return {m: math.log(v) for m, v in p.items()}


def elo(outcomes: list[tuple[str, str, float]], k: float = 16.0, base: float = 1000.0) -> dict[str, float]:
    """Elo ratings after playing the outcomes in order."""
    r: dict[str, float] = defaultdict(lambda: base)
    for i, j, s in outcomes:
        e = 1 / (1 + 10 ** ((r[j] - r[i]) / 400))
        r[i] += k * (s - e)
        r[j] -= k * (s - e)
    return dict(r)


def bootstrap(outcomes: list, fn, rounds: int, seed: int) -> dict[str, tuple[float, float]]:
    """95% intervals of fn's per-model numbers over resamples of the outcomes (with replacement)."""
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for m, v in fn([outcomes[rng.randrange(len(outcomes))] for _ in outcomes]).items():
            samples[m].append(v)
    out = {}
    for m, vs in samples.items():
        vs.sort()
        out[m] = (vs[int(0.025 * (len(vs) - 1))], vs[int(0.975 * (len(vs) - 1))])
    return out


def binomial_p(k: int, n: int) -> float:
    """Two-sided exact binomial test of k successes in n against p = 0.5."""
    if n == 0:
        return 1.0
    pmf = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    return min(1.0, sum(q for q in pmf if q <= pmf[k] * (1 + 1e-9)))


# -------------------------------------------------------------------------------------- votes
def outcomes_of(votes: list[Vote], tasks: dict) -> list[tuple[str, str, float]]:
    """(model, model, score of the first) for every judged pair; both-bad pairs say nothing about order."""
    out = []
    for v in votes:
        models = [r.model for r in tasks[v.task_id].responses]
        if v.kind == "ranking":
            ranks = v.ranks
            for i, j in itertools.combinations(range(len(ranks)), 2):
                out.append((models[i], models[j], 1.0 if ranks[i] < ranks[j] else 0.0 if ranks[i] > ranks[j] else 0.5))
        elif v.winner is not None:
            out.append((models[v.winner], models[1 - v.winner], 1.0))
        elif v.choice == "tie":
            out.append((models[0], models[1], 0.5))
    return [o for o in out if o[0] != o[1]]  # a model against itself ranks nothing


def make_report(store, bootstrap_rounds: int = 200, seed: int = 0, fast_s: float = 2.0) -> dict:
    votes = store.votes()
    if not votes:
        raise DataError(f"{store.path}: no votes to report on yet")
    tasks = {tid: store.task(tid) for tid in {v.task_id for v in votes}}
    by_task: dict[str, dict[str, str]] = defaultdict(dict)
    for v in votes:
        by_task[v.task_id][v.annotator] = v.label
    annotators = sorted({v.annotator for v in votes})
    kappas = {}
    for a, b in itertools.combinations(annotators, 2):
        shared = [t for t, labels in by_task.items() if a in labels and b in labels]
        if shared:
            k = cohen_kappa([by_task[t][a] for t in shared], [by_task[t][b] for t in shared])
            kappas[f"{a}~{b}"] = {"kappa": k, "shared_tasks": len(shared)}
    alpha = krippendorff_alpha([list(labels.values()) for labels in by_task.values()])

    outcomes = outcomes_of(votes, tasks)
    models: dict[str, dict] = {}
    if outcomes:
        played: dict[str, list[float]] = defaultdict(list)
        for i, j, s in outcomes:
            played[i].append(s)
            played[j].append(1 - s)
        bt, el = bradley_terry(outcomes), elo(outcomes)
        bt_ci = bootstrap(outcomes, bradley_terry, bootstrap_rounds, seed)
        el_ci = bootstrap(outcomes, elo, bootstrap_rounds, seed + 1)
        models = {m: {"comparisons": len(played[m]), "win_rate": sum(played[m]) / len(played[m]),
                      "bradley_terry": bt[m], "bradley_terry_ci": bt_ci.get(m), "elo": el[m], "elo_ci": el_ci.get(m)}
                  for m in sorted(played, key=lambda m: -bt[m])}

    decisive = [v for v in votes if v.kind == "pairwise" and v.winner is not None]
    left = sum(v.winner == v.shown[0] for v in decisive)
    speed = {}
    for a in annotators:
        secs = [v.seconds for v in votes if v.annotator == a and v.seconds is not None]
        med = median(secs) if secs else None
        speed[a] = {"votes": sum(v.annotator == a for v in votes), "median_seconds": med,
                    "too_fast": med is not None and med < fast_s}
    return {"votes": len(votes), "tasks": len(by_task), "annotators": annotators,
            "agreement": {"krippendorff_alpha": alpha, "cohen_kappa": kappas,
                          "mean_kappa": _mean([k["kappa"] for k in kappas.values() if k["kappa"] is not None])},
            "models": models,
            "position_bias": {"decisive_pairwise_votes": len(decisive), "left_wins": left,
                              "left_share": left / len(decisive) if decisive else None,
                              "p_value": binomial_p(left, len(decisive))},
            "annotator_speed": speed, "fast_threshold_s": fast_s}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(r: dict) -> str:
    lines = [f"# Feedback report\n\n{r['votes']} votes on {r['tasks']} tasks by {len(r['annotators'])} annotators.\n",
             "## Agreement\n", f"- Krippendorff's alpha (nominal): {_f(r['agreement']['krippendorff_alpha'])}",
             f"- Cohen's kappa, mean over annotator pairs: {_f(r['agreement']['mean_kappa'])}"]
    for pair, k in r["agreement"]["cohen_kappa"].items():
        lines.append(f"  - {pair}: {_f(k['kappa'])} on {k['shared_tasks']} shared tasks")
    lines += ["", "## Models\n", "| model | comparisons | win rate | Bradley-Terry (95% CI) | Elo (95% CI) |",
              "|---|---|---|---|---|"]
    for m, s in r["models"].items():
        bt, el = s["bradley_terry_ci"] or (None, None), s["elo_ci"] or (None, None)
        lines.append(f"| {m} | {s['comparisons']} | {s['win_rate']:.3f} | {s['bradley_terry']:.2f} "
                     f"({_f(bt[0], 2)}, {_f(bt[1], 2)}) | {s['elo']:.0f} ({_f(el[0], 0)}, {_f(el[1], 0)}) |")
    pb = r["position_bias"]
    lines += ["", "## Checks\n",
              f"- Position bias: the left response won {pb['left_wins']} of {pb['decisive_pairwise_votes']} decisive "
              f"pairwise votes ({_f(pb['left_share'])}; binomial p = {_f(pb['p_value'])})",
              f"- Annotator speed (median seconds per vote; under {r['fast_threshold_s']:g} s is flagged):"]
    for a, s in r["annotator_speed"].items():
        flag = " **too fast**" if s["too_fast"] else ""
        lines.append(f"  - {a}: {s['votes']} votes, {_f(s['median_seconds'], 1)} s{flag}")
    return "\n".join(lines) + "\n"


def write_report(r: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(r, indent=2))
    (out / "report.md").write_text(markdown(r))
    if r["models"]:
        names = list(r["models"])
        bt = [r["models"][m]["bradley_terry"] for m in names]
        ci = [r["models"][m]["bradley_terry_ci"] or (b, b) for m, b in zip(names, bt)]
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(names)))
        ax.errorbar(bt, range(len(names)), xerr=[[b - c[0] for b, c in zip(bt, ci)], [c[1] - b for b, c in zip(bt, ci)]],
                    fmt="o", capsize=4)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("Bradley-Terry log-strength (95% bootstrap CI)")
        fig.tight_layout()
        fig.savefig(out / "models.png", dpi=100)
        plt.close(fig)
    speed = r["annotator_speed"]
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(speed)), 3))
    ax.bar(range(len(speed)), [s["median_seconds"] or 0 for s in speed.values()],
           color=["C3" if s["too_fast"] else "C0" for s in speed.values()])
    ax.axhline(r["fast_threshold_s"], color="C3", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(speed)), list(speed), rotation=45, fontsize=7)
    ax.set_ylabel("median seconds per vote")
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=100)
    plt.close(fig)
    return out
