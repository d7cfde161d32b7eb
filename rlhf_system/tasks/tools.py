"""A tool-use task family for the synthetic generator: arithmetic on 5- and 6-digit numbers, which a tiny
model cannot compute in its head but can delegate to the calculator tool (envs/tools.py).

    rlhf make-data OUT --tools          # writes tool_sft_train / tool_sft_test / rl_tool_train / rl_tool_test

A demonstration is a tool-using conversation: the user's question, an assistant turn that calls the
calculator, the tool's result, and an assistant turn that states it:

    user:       Multiply the two numbers.\\n\\n48213 * 79132
    assistant:  <tool_call>{"name": "calculator", "arguments": {"expression": "48213 * 79132"}}</tool_call>
    tool:       3815175516
    assistant:  3815175516

With `demo_flaws=p` a seeded fraction p of the training demonstrations skip the tool and guess (a
near-miss of the right number), as careless demonstrators would; RL with the calculator available is
what teaches the model to call it every time. RL prompts carry the answer and the `exact` check, so the
synthetic verifiers and the `synthetic` reward rules score them (the final assistant turn must be the
number). Standard library only; deterministic in `seed`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf_system.envs.tools import format_call
from rlhf_system.tasks.files import atomic_write
from rlhf_system.tasks.synthetic import PHRASINGS, Instance

FAMILY = "tool_arithmetic"
TASKS = {"add": "+", "sub": "-", "mul": "*"}


def make_instance(task: str, rng: random.Random, digits: int = 3) -> Instance:
    """One question with `digits`-digit operands (mul: the second has one digit less)."""
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    a = rng.randint(lo, hi)
    b = rng.randint(lo // 10, hi // 10) if task == "mul" else rng.randint(lo, hi)
    if task == "sub" and b > a:
        a, b = b, a
    value = {"add": a + b, "sub": a - b, "mul": a * b}[task]
    phrasing = rng.randrange(len(PHRASINGS["arithmetic"][task]))
    return Instance(FAMILY, task, PHRASINGS["arithmetic"][task][phrasing], f"{a} {TASKS[task]} {b}", str(value),
                    phrasing)


def demonstration(inst: Instance) -> list[dict]:
    return [{"role": "user", "content": inst.prompt_text()},
            {"role": "assistant", "content": format_call("calculator", expression=inst.input)},
            {"role": "tool", "content": inst.output},
            {"role": "assistant", "content": inst.output}]


def guess(inst: Instance, rng: random.Random) -> str:
    """A near miss: the right number with one digit changed."""
    digits = list(inst.output)
    i = rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and (i or d != "0" or len(digits) == 1)])
    return "".join(digits)


def generate(seed: int = 0, n_train: int = 1000, n_test: int = 200) -> dict[str, list[Instance]]:
    """Disjoint questions: test (n_test), sft (n_train demonstrations) and rl (n_train prompts for RL,
    none of them demonstrated, so RL gains are not recall of SFT answers)."""
    rng = random.Random(f"{seed}/tools")
    tasks = list(TASKS)
    seen: set[str] = set()
    out: dict[str, list[Instance]] = {}
    for split, k in (("test", n_test), ("sft", n_train), ("rl", n_train)):
        out[split] = []
        while len(out[split]) < k:
            inst = make_instance(tasks[len(out[split]) % len(tasks)], rng)
            if inst.prompt_text() not in seen:
                seen.add(inst.prompt_text())
                out[split].append(inst)
    return out


def write_tool_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 1000, n_test: int = 200,
                       demo_flaws: float = 0.0) -> dict[str, Path]:
    """tool_sft_train/test (messages with tool calls; a fraction `demo_flaws` of train rows guess
    instead, marked "flaw") and rl_tool_train/test (prompts with answers; the RL training prompts are
    not the demonstrated ones, and carry the tool call a demonstration would start with as `response`).
    Returns stem -> path."""
    if not 0.0 <= demo_flaws < 1.0:
        raise ValueError(f"demo_flaws must be in [0, 1), got {demo_flaws}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = generate(seed, n_train, n_test)
    rng = random.Random(f"{seed}/tools/flaws")
    sft_train = []
    for inst in s["sft"]:
        row = {"messages": demonstration(inst), "family": FAMILY, "task": inst.task}
        if rng.random() < demo_flaws:
            row["messages"] = [row["messages"][0], {"role": "assistant", "content": guess(inst, rng)}]
            row["flaw"] = "guessed"
        sft_train.append(row)
    records = {
        "tool_sft_train": sft_train,
        "tool_sft_test": [{"messages": demonstration(i), "family": FAMILY, "task": i.task} for i in s["test"]],
        # the first turn of a demonstration, a reference response for GKD's off-policy share (trainers/gkd.py)
        "rl_tool_train": [i.to_prompt() | {"response": demonstration(i)[1]["content"]} for i in s["rl"]],
        "rl_tool_test": [i.to_prompt() for i in s["test"]],
    }
    return {name: atomic_write(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
            for name, recs in records.items()}


def corpus_texts(seed: int = 0, n: int = 500) -> list[str]:
    """Texts for a tokenizer that will see tool calls: demonstrations rendered as plain text."""
    rng = random.Random(f"{seed}/tools/corpus")
    return [m["content"] for _ in range(n) for m in demonstration(make_instance(rng.choice(list(TASKS)), rng))]
