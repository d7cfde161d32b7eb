"""Generation-based evaluation on a prompt set with rule-based verifiers (data/synthetic.py).

Greedy completions for each prompt, scored with the synthetic tasks' verifiers: exact match, rule
reward, format and refusal rates, overall and per family. It works with any HF checkpoint whose
prompt file carries the `check`/`answer` fields the verifiers read. This is the in-process
evaluator; `rlhf eval` (with reward models and quantised loading) builds on it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def load_prompts(path: str | Path, limit: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def score(rows: list[dict], completions: list[str]) -> dict:
    """Aggregate verifier results: overall and per family."""
    from rlhf_system.data import synthetic

    groups: dict[str, list[dict]] = defaultdict(list)
    for row, text in zip(rows, completions):
        v = synthetic.verify(row, text)
        result = {"exact": float(v["correct"]), "reward": synthetic.reward(row, text),
                  "format_ok": float(v["format_ok"]), "refused": float(v["refused"])}
        groups["all"].append(result)
        if row.get("family"):
            groups[row["family"]].append(result)

    def mean(items, key):
        return sum(r[key] for r in items) / max(1, len(items))

    keys = ("exact", "reward", "format_ok", "refused")
    return {fam: {"n": len(items), **{k: round(mean(items, k), 4) for k in keys}}
            for fam, items in sorted(groups.items())}


def evaluate_model(model_path: str | Path, prompts: list[dict], max_new_tokens: int = 24,
                   batch_size: int = 64) -> tuple[dict, list[str]]:
    """Greedy HF generation + scoring. Returns (metrics by family, completions)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_system.models.generate import chat_prompts, hf_generate

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = chat_prompts(tok, [r["prompt"] for r in prompts])
    outs: list[list[int]] = []
    for i in range(0, len(ids), batch_size):
        outs += hf_generate(model, tok, ids[i:i + batch_size], max_new_tokens)
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    return score(prompts, texts), texts


def markdown_table(report: dict[str, dict]) -> str:
    """Models as rows, overall and per-family exact match as columns."""
    families = sorted({f for metrics in report.values() for f in metrics if f != "all"})
    head = ["model", "exact", "reward", "format_ok", "refused"] + [f"exact:{f}" for f in families]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, m in report.items():
        cells = [model] + [f"{m['all'][k]:.3f}" for k in ("exact", "reward", "format_ok", "refused")]
        cells += [f"{m[f]['exact']:.3f}" if f in m else "-" for f in families]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
