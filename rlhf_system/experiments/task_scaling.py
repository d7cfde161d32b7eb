"""`rlhf experiment task-scaling`: a miniature of the task-count experiment of the instruction-tuning
literature (FLAN, T0, Super-NaturalInstructions): does tuning on more task families help on families
never tuned on?

    rlhf experiment task-scaling --out runs/experiments/task-scaling [--seeds 0 1 2] [--counts 1 2 4] [--smoke]

Per seed, the seen families are put in a seeded order; the point with k families tunes the same base
model on the first k of them (nested: k=2 adds one family to k=1), always on the same number of training
examples. Every point is then measured greedily on the held-out sets, above all on the composed families
(synthetic.COMPOSED: near transfer, built from the seen families' skills) and on `sort` (far transfer:
no seen family teaches ordering, the control). k=0 is the untuned base model.

Writes results.jsonl (a line per point, also on stdout; the sweep is resumable), task_scaling.md (mean ±
sample std over seeds per k) and task_scaling.png (composed-family exact match and rule reward against
k, with error bars, and `sort` beside it). Points run the same in-process trainer as `rlhf train sft`; under
`ray job submit` (RAY_ADDRESS set) each one runs as a Ray actor.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf_system.config import ConfigError
from rlhf_system.experiments import common
from rlhf_system.experiments.common import Budget
from rlhf_system.tasks import synthetic

FULL = Budget(n_train=4000, epochs=5, n_test=200)
SMOKE = Budget(n_train=320, epochs=1, n_test=20, small_model=True)


def family_order(seed: int) -> list[str]:
    """The seen families in the order this seed adds them."""
    order = list(synthetic.SEEN_FAMILIES)
    random.Random(f"task-scaling/{seed}").shuffle(order)
    return order


def check_counts(counts: list[int]) -> None:
    n = len(synthetic.SEEN_FAMILIES)
    bad = [k for k in counts if not 1 <= k <= n]
    if bad or not counts or len(set(counts)) != len(counts):
        raise ConfigError(f"--counts: distinct numbers of tuning families in 1..{n}, got {counts}")


def run(out: str | Path, seeds: list[int], counts: list[int], budget: Budget, emit=print) -> list[dict]:
    """The sweep (points already in results.jsonl are skipped). Returns every row."""
    common.check_seeds(seeds)
    check_counts(counts)
    out = Path(out)
    common.claim(out, "task-scaling", budget)
    base = common.base_model(out, budget)
    results = common.Results(out / "results.jsonl", key=lambda r: (r["k"], r["seed"]))
    for seed in seeds:
        order = family_order(seed)
        for k in [0, *sorted(counts)]:
            if (k, seed) in results.done:
                continue
            point = out / f"k{k}-seed{seed}"
            families = tuple(f for f in synthetic.SEEN_FAMILIES if f in order[:k])
            # the held-out sets depend on the seed alone: every k of a seed is measured on the same prompts
            common.write_data(point / "data", seed, budget, families=families or synthetic.SEEN_FAMILIES)
            row = {"k": k, "seed": seed, "families": list(families), "n_train": budget.n_train, "epochs": budget.epochs}
            model = base
            if k:
                row |= common.train_point(point / "sft", base, point / "data", seed, budget, [])
                model = point / "sft" / "hf"
            results.add({**row, "eval": common.evaluate(model, point / "data", budget.n_test)}, emit)
    report(results.rows, out)
    return results.rows


# ------------------------------------------------------------------------------------------ report
def summary(rows: list[dict]) -> dict[int, dict[str, list[float]]]:
    """k -> metric -> one value per seed: composed exact / reward (all composed families together),
    each composed family's exact, sort's exact and the seen families' exact."""
    out: dict[int, dict[str, list[float]]] = {}
    for r in sorted(rows, key=lambda r: (r["k"], r["seed"])):
        e = r["eval"]
        m = out.setdefault(r["k"], {})
        values = {"composed_exact": e["test_composed"]["all"]["exact"],
                  "composed_reward": e["test_composed"]["all"]["reward"],
                  "sort_exact": e["test_unseen_family"]["all"]["exact"],
                  "seen_exact": e["test_seen"]["all"]["exact"],
                  **{f"{f}_exact": e["test_composed"][f]["exact"] for f in synthetic.COMPOSED_FAMILIES
                     if f in e["test_composed"]}}
        for name, v in values.items():
            m.setdefault(name, []).append(v)
    return out


def markdown(rows: list[dict]) -> str:
    s = summary(rows)
    fams = [f for f in synthetic.COMPOSED_FAMILIES]
    head = ["k tuning families", "seeds", "composed exact", "composed rule reward",
            *[f"{f} ({'+'.join(synthetic.PARENTS[f])})" for f in fams], "sort (control)", "seen families"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, m in s.items():
        cells = [f"{k} (base)" if k == 0 else str(k), str(len(m["composed_exact"])), common.cell(m["composed_exact"]),
                 common.cell(m["composed_reward"]), *[common.cell(m[f"{f}_exact"]) for f in fams],
                 common.cell(m["sort_exact"]), common.cell(m["seen_exact"])]
        lines.append("| " + " | ".join(cells) + " |")
    points = sorted((r["seed"], r["k"], r["families"]) for r in rows if r["k"] > 0)
    tuned = "; ".join(f"seed {seed}, k={k}: {', '.join(f)}" for seed, k, f in points)
    return ("# rlhf experiment task-scaling\n\nGreedy exact match (mean ± sample std over seeds) on held-out "
            "families, after SFT of one base model on k seen families with the same number of examples. "
            "Composed families are built from the seen families' skills (their parents in brackets); "
            "`sort` needs a skill no seen family teaches.\n\n" + "\n".join(lines)
            + f"\n\nFamilies tuned per point: {tuned}.\n")


def report(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "task_scaling.md").write_text(markdown(rows))
    s = summary(rows)
    ks = sorted(s)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in (("composed_exact", "composed families: exact"),
                        ("composed_reward", "composed families: rule reward"),
                        ("sort_exact", "sort (control): exact")):
        stats = [common.mean_std(s[k][name]) for k in ks]
        ax.errorbar(ks, [m for m, _ in stats], yerr=[e for _, e in stats], marker="o", capsize=4, label=label)
    for i, f in enumerate(synthetic.COMPOSED_FAMILIES):  # what each composed family adds to the mean
        ax.plot(ks, [common.mean_std(s[k][f"{f}_exact"])[0] for k in ks], ":", color=f"C{i + 3}", lw=1,
                label=f"  {f} ({'+'.join(synthetic.PARENTS[f])})")
    ax.set_xticks(ks, [f"{k}\n(base)" if k == 0 else str(k) for k in ks])
    ax.set_xlabel("seen families tuned on (same number of examples)")
    ax.set_ylabel("held-out score (greedy)")
    ax.set_ylim(-0.02, 1.02)
    seeds = max(len(v["composed_exact"]) for k, v in s.items() if k > 0) if len(ks) > 1 else 0
    ax.set_title(f"Unseen-family score vs number of tuning families ({seeds} seeds, ±1 std)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "task_scaling.png", dpi=100)
    plt.close(fig)
