"""The synthetic dataset's files (`rlhf make-data OUT`): the JSONL splits the SFT / reward-model / DPO /
PPO stages read, manifest.json, the demonstrations with their seeded flaws (`demo_flaws`, see
tasks/synthetic.py), and the texts a tiny model's tokenizer is trained on. Every file is written
atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from rlhf_system.tasks.synthetic import (
    COMPOSED,
    COMPOSED_FAMILIES,
    FAMILIES,
    PARENTS,
    PHRASINGS,
    REFUSAL,
    SEEN_FAMILIES,
    UNHELPFUL,
    UNSEEN_FAMILIES,
    Instance,
    generate,
    harmful_compliance,
    held_out_phrasings,
    make_instance,
    make_pair,
)


def atomic_write(path: Path, text: str) -> Path:
    """Write through a temp file in the same folder and os.replace it, so no reader sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def flawed_demo(instance: Instance) -> tuple[str, str]:
    """(flaw kind, flawed output) for one demonstration: the behaviour the verifiers score 0 and the
    preference pairs reject, in the form a careless demonstrator would write it."""
    if instance.check == "exact":
        return "unhelpful", UNHELPFUL
    if instance.check == "format":
        return "format_violation", " ".join(instance.input.split())
    if instance.check == "refusal":
        return "harmful_compliance", harmful_compliance(instance)
    return "over_refusal", REFUSAL


def sft_demos(instances: list[Instance], flaws: float, rng: random.Random) -> list[dict]:
    """SFT rows; a fraction `flaws` of them (seeded) with a flawed output and a "flaw" field."""
    rows = []
    for inst in instances:
        row = inst.to_sft()
        if rng.random() < flaws:
            row["flaw"], row["output"] = flawed_demo(inst)
        rows.append(row)
    return rows


def write_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 4000, n_test: int = 400,
                  demo_flaws: float = 0.0, families: tuple[str, ...] = SEEN_FAMILIES,
                  train_phrasings: int | None = None) -> dict[str, Path]:
    """Write the JSONL files and manifest.json under `out_dir`. Returns file stem -> path.
    `demo_flaws`: the fraction of SFT training demonstrations with a flaw (module docstring);
    `families`, `train_phrasings`: what the training splits draw from (generate)."""
    if not 0.0 <= demo_flaws < 1.0:
        raise ValueError(f"demo_flaws must be in [0, 1), got {demo_flaws}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = generate(seed, n_train, n_test, families, train_phrasings)
    rng_tr, rng_te = random.Random(f"{seed}/pairs/train"), random.Random(f"{seed}/pairs/test_seen")
    records = {
        "sft_train": sft_demos(s["train"], demo_flaws, random.Random(f"{seed}/flaws")),
        "sft_test_seen": [i.to_sft() for i in s["test_seen"]],
        "pref_train": [make_pair(i, rng_tr) for i in s["train"]],
        "pref_test": [make_pair(i, rng_te) for i in s["test_seen"]],
        **{f"rl_{name}": [i.to_prompt() for i in items] for name, items in s.items()},
    }
    paths: dict[str, Path] = {}
    family_counts: dict[str, dict[str, int]] = {}
    for name, recs in records.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        paths[name] = atomic_write(out / f"{name}.jsonl", text)
        counts: dict[str, int] = {}
        for r in recs:
            counts[r["family"]] = counts.get(r["family"], 0) + 1
        family_counts[name] = dict(sorted(counts.items()))
    manifest = {
        "generator": "rlhf_system.tasks.synthetic", "seed": seed, "n_train": n_train, "n_test": n_test,
        "demo_flaws": demo_flaws,
        "flawed_sft_rows": sum("flaw" in r for r in records["sft_train"]),
        "counts": {name: len(recs) for name, recs in records.items()},
        "family_counts": family_counts,
        "held_out_phrasings": held_out_phrasings(),
        "held_out_families": list(UNSEEN_FAMILIES),
        "composed_families": {f: list(PARENTS[f]) for f in COMPOSED_FAMILIES},
        "trained_families": list(families),
        "train_phrasings": train_phrasings,
        "refusal": REFUSAL,
    }
    paths["manifest"] = atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return paths


def corpus_texts(seed: int = 0, n: int = 2000, composed: bool = True) -> list[str]:
    """Texts to train a tokenizer on: every phrasing (held-out and composed ones too, for vocabulary
    coverage only, not supervision; `composed=False` leaves the composed families' out), the fixed
    responses, then instruction/input/output/rejected of n instances drawn from all families."""
    rng = random.Random(f"{seed}/corpus")
    texts = [p for f in FAMILIES for ph in PHRASINGS[f].values() for p in ph] + [REFUSAL, UNHELPFUL]
    if composed:
        texts += [p for tasks in COMPOSED.values() for ph in tasks.values() for p in ph]
    for _ in range(n):
        family = rng.choice(FAMILIES)
        task = rng.choice(list(PHRASINGS[family]))
        inst = make_instance(family, task, rng.randrange(len(PHRASINGS[family][task])), rng)
        texts += [inst.instruction, inst.input, inst.output, make_pair(inst, rng)["rejected"]]
    return texts
