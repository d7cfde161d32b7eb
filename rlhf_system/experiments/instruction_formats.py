"""`rlhf experiment instruction-formats`: the other axis of the instruction-tuning literature, the form
of the instructions, at equal data.

    rlhf experiment instruction-formats --out runs/experiments/instruction-formats [--seeds 0 1 2] [--smoke]

Three variants tune the same base model on every seen family with the same number of examples:

    several     every seen phrasing of each task (4 per task): today's SFT data
    one         only the first phrasing of each task
    system      several, with a system turn (SYSTEM) before every prompt, in training and evaluation

Each is measured greedily on the held-out phrasings (`test_unseen_phrasing`: the last 2 phrasings of
every task, never trained on by any variant), the seen phrasings, and the composed families. Writes
results.jsonl (resumable; a line per point, also on stdout), instruction_formats.md and
instruction_formats.png (unseen-phrasing exact match per variant, mean ± sample std over seeds).
"""

from __future__ import annotations

from pathlib import Path

from rlhf_system.experiments import common
from rlhf_system.experiments.common import Budget

FULL = Budget(n_train=4000, epochs=5, n_test=200)
SMOKE = Budget(n_train=320, epochs=1, n_test=20, small_model=True)
SYSTEM = "You are a helpful assistant. Follow the instruction and answer briefly."
VARIANTS = {"several": {}, "one": {"train_phrasings": 1}, "system": {"system": SYSTEM}}
SETS = (("test_unseen_phrasing", "unseen phrasings"), ("test_seen", "test_seen (4 phrasings)"),
        ("test_composed", "composed families"))


def run(out: str | Path, seeds: list[int], budget: Budget, emit=print) -> list[dict]:
    """Every variant for every seed (points already in results.jsonl are skipped). Returns every row."""
    common.check_seeds(seeds)
    out = Path(out)
    common.claim(out, "instruction-formats", budget)
    base = common.base_model(out, budget)
    results = common.Results(out / "results.jsonl", key=lambda r: (r["variant"], r["seed"]))
    for seed in seeds:
        for variant, v in VARIANTS.items():
            if (variant, seed) in results.done:
                continue
            point, system = out / f"{variant}-seed{seed}", v.get("system", "")
            common.write_data(point / "data", seed, budget, train_phrasings=v.get("train_phrasings"))
            extra = [f"data.system_prompt={system}"] if system else []
            trained = common.train_point(point / "sft", base, point / "data", seed, budget, extra)
            results.add({"variant": variant, "seed": seed, "system_prompt": system,
                         "train_phrasings": v.get("train_phrasings"), "n_train": budget.n_train,
                         "epochs": budget.epochs, **trained,
                         "eval": common.evaluate(point / "sft" / "hf", point / "data", budget.n_test, system)}, emit)
    report(results.rows, out)
    return results.rows


def summary(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """variant -> "<set>/<exact|reward>" -> one value per seed."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        m = out.setdefault(r["variant"], {})
        for name, _ in SETS:
            for metric in ("exact", "reward"):
                m.setdefault(f"{name}/{metric}", []).append(r["eval"][name]["all"][metric])
    return {v: out[v] for v in VARIANTS if v in out}


def markdown(rows: list[dict]) -> str:
    s = summary(rows)
    head = ["variant", "seeds", *[f"{title}: exact" for _, title in SETS], "unseen phrasings: rule reward"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, m in s.items():
        lines.append("| " + " | ".join([variant, str(len(m["test_seen/exact"])),
                                        *[common.cell(m[f"{name}/exact"]) for name, _ in SETS],
                                        common.cell(m["test_unseen_phrasing/reward"])]) + " |")
    return ("# rlhf experiment instruction-formats\n\nSFT of one base model on every seen family with the same "
            "number of examples; greedy exact match, mean ± sample std over seeds. several: 4 phrasings per "
            "task; one: the first phrasing only; system: several, with the system turn "
            f"\"{SYSTEM}\" in training and evaluation. Unseen phrasings are never trained on by any "
            "variant; test_seen holds the 4 phrasings `several` trains on, of which `one` saw only the "
            "first.\n\n" + "\n".join(lines) + "\n")


def report(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "instruction_formats.md").write_text(markdown(rows))
    s = summary(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(SETS)
    for i, (name, title) in enumerate(SETS):
        stats = [common.mean_std(m[f"{name}/exact"]) for m in s.values()]
        ax.bar([j - 0.4 + (i + 0.5) * width for j in range(len(s))], [m for m, _ in stats], width,
               yerr=[e for _, e in stats], capsize=3, label=title)
    ax.set_xticks(range(len(s)), list(s))
    ax.set_ylabel("exact match (greedy)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Instruction formats at equal data (±1 std over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "instruction_formats.png", dpi=100)
    plt.close(fig)
