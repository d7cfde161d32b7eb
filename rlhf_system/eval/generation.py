"""Generation-based evaluation on a prompt set with rule-based verifiers (tasks/synthetic.py).

Greedy completions for each prompt, scored with the synthetic tasks' verifiers: exact match, rule
reward, format and refusal rates, overall and per family. It works with any HF checkpoint whose
prompt file carries the `check`/`answer` fields the verifiers read. This is the in-process
evaluator; `rlhf eval` (eval/report.py: reward rules, reward models, quantised loading, the
alignment table) builds on it, and PPO's held-out evaluation reuses `score`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

# What the synthetic verifiers read from a prompt row (synthetic._spec).
VERIFIER_KEYS = ("answer", "task")


def load_prompts(path: str | Path, limit: int = 0) -> list[dict]:
    """Rows of a prompt JSONL file (the first `limit`, or all). A missing file, a malformed line or a
    row without a "prompt" (string or message list) is a DataError naming the file and line."""
    from rlhf_system.data.sources import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} not found. Fix: rlhf make-data OUT writes OUT/rl_test_*.jsonl")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            prompt = row.get("prompt")
            if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
                raise DataError(f"{path}:{lineno}: no \"prompt\" (a non-empty string or message list); "
                                f"keys found: {sorted(row)}")
            rows.append(row)
            if limit and len(rows) == limit:
                break
    if not rows:
        raise DataError(f"prompt file {path} holds no prompts")
    return rows


def verifiable(rows: list[dict]) -> bool:
    """Whether every row carries what the synthetic verifiers need (answer, task, check or family)."""
    return all(all(k in r for k in VERIFIER_KEYS) and ("check" in r or "family" in r) for r in rows)


def score(rows: list[dict], completions: list[str]) -> dict:
    """Aggregate verifier results: overall and per family."""
    from rlhf_system.tasks import synthetic

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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", eq. 1): 1 - C(n - c, k) / C(n, k), the chance that k samples drawn
    without replacement from the n hold at least one correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sampled_score(rows: list[dict], completions: list[str], n: int, ks: list[int]) -> dict:
    """n sampled completions per row (row-major: row i's are completions i*n .. i*n+n-1) -> per family
    {"mean@n": mean exact over every sample, "pass@k": mean over rows of `pass_at_k`, for each k}."""
    from rlhf_system.tasks import synthetic

    if len(completions) != n * len(rows):
        raise ValueError(f"{len(completions)} completions for {len(rows)} rows of {n} samples")
    correct: dict[str, list[int]] = defaultdict(list)  # per family: correct samples per row
    for i, row in enumerate(rows):
        c = sum(synthetic.verify(row, t)["correct"] for t in completions[i * n:(i + 1) * n])
        for fam in ("all", row.get("family")) if row.get("family") else ("all",):
            correct[fam].append(c)
    return {fam: {f"mean@{n}": round(sum(cs) / (n * len(cs)), 4),
                  **{f"pass@{k}": round(sum(pass_at_k(n, c, k) for c in cs) / len(cs), 4) for k in ks}}
            for fam, cs in sorted(correct.items())}


def load_for_eval(model_path: str | Path, quant: str = "none"):
    """(causal LM in eval mode, tokenizer): float32, or bitsandbytes 4bit (NF4) / 8bit (LLM.int8)."""
    import logging

    from rlhf_system.config import ModelConfig
    from rlhf_system.models.load import load_causal_lm, load_tokenizer

    cfg = ModelConfig(path=str(model_path), dtype="float32")
    if quant == "8bit":  # LLM.int8 casts fp32 activations to fp16 and logs it on every matmul
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return load_causal_lm(cfg, frozen_quant=quant).eval(), load_tokenizer(cfg)


def memory(model) -> dict:
    """What a loaded model holds: transformers' get_memory_footprint (parameters and buffers) and the
    parameters alone, in bytes."""
    from rlhf_system.models.load import param_bytes

    return {"footprint_bytes": int(model.get_memory_footprint()), "param_bytes": int(param_bytes(model))}


def generate_greedy(model, tokenizer, prompts: list[dict], max_new_tokens: int = 24,
                    batch_size: int = 64) -> list[str]:
    """Greedy completions (special tokens stripped), one per prompt row, in order."""
    from rlhf_system.models.generate import chat_prompts, hf_generate

    ids = chat_prompts(tokenizer, [r["prompt"] for r in prompts])
    outs: list[list[int]] = []
    for i in range(0, len(ids), batch_size):
        outs += hf_generate(model, tokenizer, ids[i:i + batch_size], max_new_tokens)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def evaluate_model(model_path: str | Path, prompts: list[dict], max_new_tokens: int = 24,
                   batch_size: int = 64) -> tuple[dict, list[str]]:
    """Greedy HF generation (float32) + scoring. Returns (metrics by family, completions)."""
    model, tok = load_for_eval(model_path)
    texts = generate_greedy(model, tok, prompts, max_new_tokens, batch_size)
    return score(prompts, texts), texts
