"""`rlhf eval` as a function: several models on one prompt set, with reward rules, a reward model,
quantised loading, and the comparison of a quantised model with its full-precision self.

    report = evaluate_models({"base": "runs/demo/tiny/policy", "sft": "runs/demo/sft/hf"}, prompts,
                             EvalOptions(reward_model="runs/demo/rm/hf"))
    print(markdown_report(report))
    print(alignment_table({name: entry["alignment"] for name, entry in report.items()}))

`check_inputs` runs every check that needs no model (folders, rules against every prompt row,
bitsandbytes) so that a user error is one line before any weight loads. `evaluate_models` then, per
model: loads it (float32, or 4bit NF4 / 8bit through bitsandbytes), records its memory, generates
greedy completions (eval/generation.py), scores them with the rules, the synthetic verifiers and the
reward model (models/reward_score.py), and with `compare_full_precision` repeats that in float32 on the
same prompts and reports the differences.

The report maps each model's name to one entry. For backward compatibility (launch/demo.sh reads
`report[model]["all"]["exact"]`) an entry's per-family metrics sit at its top level, beside the
SECTION_KEYS:

    {"all": {"n", "exact", "reward", "format_ok", "refused", "rule:<name>"..., "rm_score"}, "<family>": {...},
     "path": str, "quant": "none|4bit|8bit",
     "memory": {"footprint_bytes", "param_bytes"},           # the evaluated (maybe quantised) model
     "alignment": {...},                                     # eval/alignment.py's metrics
     "reward_model": {"path", "quant", "footprint_bytes"},   # with a reward model
     "full_precision": {"memory", "families", "alignment"},  # with compare_full_precision
     "delta": {"memory_ratio", "same_completion", "families": {family: {metric: quant - fp32}},
               "alignment": {metric: quant - fp32}}}
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from rlhf_system.config import ConfigError
from rlhf_system.eval import alignment
from rlhf_system.eval.generation import generate_greedy, load_for_eval, memory, score, verifiable

SECTION_KEYS = ("path", "quant", "memory", "alignment", "reward_model", "full_precision", "delta")
QUANTS = ("none", "4bit", "8bit")
MIB = 2 ** 20


@dataclass
class EvalOptions:
    max_new_tokens: int = 24
    batch_size: int = 64
    rules: tuple[str, ...] = ("synthetic",)   # rewards/registry.py names or "file.py:function"
    reward_model: str = ""                    # a sequence-classifier folder (rlhf train rm's run_dir/hf)
    rm_quant: str = "none"                    # loading of the reward model: none|4bit|8bit
    template: str = "chat"                    # how the reward model renders a conversation (its data.template)
    quant: str = "none"                       # loading of the evaluated models: none|4bit|8bit
    compare_full_precision: bool = False      # also evaluate each model in float32 and report deltas


def families(entry: dict) -> dict[str, dict]:
    """The per-family metrics of a report entry (everything but the SECTION_KEYS)."""
    return {k: v for k, v in entry.items() if k not in SECTION_KEYS}


# ------------------------------------------------------------------------------------------ checks
def check_inputs(models: dict[str, str], prompts: list[dict], opts: EvalOptions) -> None:
    """Every user error that needs no model weights, as one-line ConfigErrors."""
    from rlhf_system.models.load import check_bitsandbytes
    from rlhf_system.models.reward_score import check_reward_model

    for path in models.values():
        if not Path(path, "config.json").is_file():
            raise ConfigError(f"rlhf eval: '{path}' is not a model folder (no config.json)")
    clash = sorted({r["family"] for r in prompts if r.get("family") in SECTION_KEYS})
    if clash:
        raise ConfigError(f"prompt family names {clash} clash with report sections {list(SECTION_KEYS)}. "
                          "Fix: rename those families")
    for field, value in (("--quant", opts.quant), ("--rm-quant", opts.rm_quant)):
        if value not in QUANTS:
            raise ConfigError(f"{field}: {value!r} is not one of {', '.join(QUANTS)}")
    if opts.compare_full_precision and opts.quant == "none":
        raise ConfigError("--compare-full-precision compares a quantised evaluation with float32, but --quant is "
                          "none. Fix: add --quant 4bit (or 8bit)")
    if not opts.reward_model and opts.rm_quant != "none":
        raise ConfigError(f"--rm-quant {opts.rm_quant} without --reward-model. Fix: add --reward-model RM_DIR")
    if opts.reward_model:
        check_reward_model(opts.reward_model)
    if opts.rules:
        _check_rules(opts.rules, prompts)
    check_bitsandbytes(opts.quant, "--quant")
    if opts.reward_model:
        check_bitsandbytes(opts.rm_quant, "--rm-quant")


def _check_rules(names: tuple[str, ...], prompts: list[dict]) -> None:
    """Load the rules and dry-run them on every prompt row with an empty response: a rule that is
    unknown, or a row missing a key a rule reads, is an error now rather than after generation."""
    from rlhf_system.rewards.registry import RewardError, RuleRewards

    try:
        rules = RuleRewards(list(names))
    except RewardError as e:
        raise ConfigError(f"--rules: {e}") from None
    for i, row in enumerate(prompts):
        for name, fn in zip(rules.names, rules.fns):
            try:
                fn(_prompt_text(row), "", row)
            except RewardError as e:
                raise ConfigError(f"--rules {name}: prompt row {i + 1}: {e}. Fix: use prompts with those "
                                  "fields (rlhf make-data) or other rules (--rules none)") from None
            except Exception:  # a user rule may reject an empty response: the real call, later, will tell
                continue


def _prompt_text(row: dict) -> str:
    """The prompt as rule functions see it: the text, or a message list's last turn."""
    p = row["prompt"]
    return p if isinstance(p, str) else p[-1]["content"]


def _messages(row: dict) -> list[dict]:
    p = row["prompt"]
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


# ---------------------------------------------------------------------------------------- evaluate
def _mean(values: list[float]) -> float:
    return round(sum(values) / max(1, len(values)), 4)


def family_metrics(prompts: list[dict], texts: list[str], rule_values: dict[str, list[float]],
                   rm_scores: list[float] | None) -> dict[str, dict]:
    """Per family (and "all"): the synthetic verifier metrics (eval/generation.score, when the rows
    carry what they read), each rule's mean as "rule:<name>" and the mean reward-model score."""
    groups: dict[str, list[int]] = {"all": list(range(len(prompts)))}
    for i, row in enumerate(prompts):
        if row.get("family"):
            groups.setdefault(row["family"], []).append(i)
    base = score(prompts, texts) if verifiable(prompts) else {}
    out = {}
    for fam, idx in sorted(groups.items()):
        m = dict(base.get(fam, {"n": len(idx)}))
        for name, values in rule_values.items():
            m[f"rule:{name}"] = _mean([values[i] for i in idx])
        if rm_scores is not None:
            m["rm_score"] = _mean([rm_scores[i] for i in idx])
        out[fam] = m
    return out


def _evaluate_once(path: str, quant: str, prompts: list[dict], opts: EvalOptions, rules, scorer) -> tuple[dict, list[str]]:
    """One load + generation + scoring. Returns ({"memory", "families", "alignment"}, completions)."""
    model, tok = load_for_eval(path, quant)
    mem = memory(model)
    texts = generate_greedy(model, tok, prompts, opts.max_new_tokens, opts.batch_size)
    del model
    gc.collect()  # one evaluated model in memory at a time
    rule_values = rules.score_detailed([_prompt_text(r) for r in prompts], texts, prompts)[1] if rules else {}
    rm = scorer.score([{"messages": _messages(r), "response": t} for r, t in zip(prompts, texts)]) if scorer else None
    align = alignment.alignment_metrics(prompts, texts, rm) if verifiable(prompts) else {}
    return {"memory": mem, "families": family_metrics(prompts, texts, rule_values, rm), "alignment": align}, texts


def _delta(new: dict, old: dict) -> dict:
    """new - old for every numeric metric both have (counts and None left out)."""
    return {k: round(v - old[k], 4) for k, v in new.items()
            if k != "n" and not k.startswith("n_") and isinstance(v, (int, float))
            and isinstance(old.get(k), (int, float))}


def evaluate_models(models: dict[str, str] | list[str], prompts: list[dict], opts: EvalOptions | None = None) -> dict:
    """The report (module docstring) for `models` (name -> folder, or folders named by their path)."""
    from rlhf_system.models.reward_score import load_reward_scorer
    from rlhf_system.rewards.registry import RuleRewards

    opts = opts or EvalOptions()
    models = dict(models) if isinstance(models, dict) else {str(m): str(m) for m in models}
    check_inputs(models, prompts, opts)
    rules = RuleRewards(list(opts.rules)) if opts.rules else None  # checked (and dry-run) just above
    scorer = load_reward_scorer(opts.reward_model, opts.rm_quant, opts.template) if opts.reward_model else None
    report = {}
    for name, path in models.items():
        run, texts = _evaluate_once(str(path), opts.quant, prompts, opts, rules, scorer)
        entry = {**run["families"], "path": str(path), "quant": opts.quant, "memory": run["memory"],
                 "alignment": run["alignment"]}
        if scorer is not None:
            entry["reward_model"] = {"path": scorer.path, "quant": scorer.quant,
                                     "footprint_bytes": int(scorer.model.get_memory_footprint())}
        if opts.compare_full_precision:
            full, full_texts = _evaluate_once(str(path), "none", prompts, opts, rules, scorer)
            entry["full_precision"] = full
            entry["delta"] = {
                "memory_ratio": round(run["memory"]["footprint_bytes"] / full["memory"]["footprint_bytes"], 4),
                "same_completion": _mean([float(a == b) for a, b in zip(texts, full_texts)]),
                "families": {f: _delta(m, full["families"][f]) for f, m in run["families"].items()},
                "alignment": _delta(run["alignment"], full["alignment"]),
            }
        report[name] = entry
    return report


# ------------------------------------------------------------------------------------------ tables
def family_table(report: dict[str, dict]) -> str:
    """Models as rows: overall verifier metrics, rule and reward-model means, memory, per-family exact."""
    fams = sorted({f for e in report.values() for f in families(e) if f != "all"})
    overall = [k for k in ("exact", "reward", "format_ok", "refused") if any(k in e["all"] for e in report.values())]
    extra = sorted({k for e in report.values() for k in e["all"] if k.startswith("rule:") or k == "rm_score"})
    per_family = [f for f in fams if any("exact" in e.get(f, {}) for e in report.values())]
    head = ["model", *overall, *extra, "MiB"] + [f"exact:{f}" for f in per_family]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in report.items():
        cells = [name] + [f"{e['all'][k]:.3f}" if k in e["all"] else "-" for k in (*overall, *extra)]
        cells.append(f"{e['memory']['footprint_bytes'] / MIB:.2f}" if "memory" in e else "-")
        cells += [f"{e[f]['exact']:.3f}" if "exact" in e.get(f, {}) else "-" for f in per_family]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quant_table(report: dict[str, dict]) -> str:
    """Quantised vs float32 on the same prompts: memory and the change of the overall metrics."""
    rows = {n: e for n, e in report.items() if "delta" in e}
    keys = [k for k in ("exact", "reward", "rm_score") if any(k in e["delta"]["families"]["all"] for e in rows.values())]
    head = ["model", "quant", "MiB", "fp32 MiB", "memory ratio", *[f"Δ{k}" for k in keys], "same completion"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in rows.items():
        d = e["delta"]
        cells = [name, e["quant"], f"{e['memory']['footprint_bytes'] / MIB:.2f}",
                 f"{e['full_precision']['memory']['footprint_bytes'] / MIB:.2f}", f"{d['memory_ratio']:.3f}"]
        cells += [f"{d['families']['all'][k]:+.3f}" if k in d["families"]["all"] else "-" for k in keys]
        cells.append(f"{d['same_completion']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: dict[str, dict]) -> str:
    """The family table, the alignment table when the prompts are verifiable, and the quantisation table."""
    parts = [family_table(report)]
    aligned = {n: e["alignment"] for n, e in report.items() if e.get("alignment")}
    if aligned:
        parts.append(alignment.alignment_table(aligned))
    if any("delta" in e for e in report.values()):
        parts.append(quant_table(report))
    return "\n\n".join(parts)
