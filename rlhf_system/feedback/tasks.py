"""Comparison tasks: what annotators are shown. A tasks file is JSONL, one task a line:

    {"id": "t0001", "prompt": "Add 3 and 4.", "responses": [{"text": "7", "model": "sft"},
                                                           {"text": "8", "model": "base"}],
     "meta": {...}}                       # optional: the prompt row's other keys (verifiers read them)

`prompt` is a string or a list of chat messages; 2 or more responses, each with its text and the model it
came from. Two responses make a pairwise task (A / B / tie / both bad), more make a ranking task.

    tasks = read_tasks("tasks.jsonl")                       # every bad line is a DataError naming it
    tasks = tasks_from_responses(rows, k=2, seed=0)         # group {"prompt", "response", "model"} rows
    write_tasks(tasks, "tasks.jsonl")
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_system.data.sources import DataError, parse_jsonl_line


@dataclass
class Response:
    text: str
    model: str


@dataclass
class Task:
    id: str
    prompt: str | list
    responses: list[Response]
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "pairwise" if len(self.responses) == 2 else "ranking"

    def prompt_text(self) -> str:
        """The prompt as one string (message lists joined by role), for export and display."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in self.prompt)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Vote:
    """One annotator's judgement of one task, in the task's response indices (never display positions):
    what the app checks and stores, and export and the report read."""
    vote_id: str                       # the client's id: a retried request stores nothing twice
    task_id: str
    kind: str                          # "pairwise" or "ranking"
    shown: list[int]                   # the display order: shown[p] is the response at position p
    choice: str | None = None          # pairwise: "A", "B", "tie" or "both_bad"
    strength: str | None = None        # "slightly" or "clearly", with A or B only
    winner: int | None = None          # pairwise: the preferred response's index (None: tie, both bad)
    ranks: list[int] | None = None     # ranking: each response's rank, 1 best
    criteria: dict = field(default_factory=dict)  # helpful / honest / harmless -> index or "tie"
    rationale: str = ""
    unsafe: bool = False
    seconds: float | None = None       # time on the task, as the page measured it
    annotator: str = ""                # from the store (not part of the stored body)
    created: float = 0.0               # from the store: when it was committed

    STORE_ONLY = ("annotator", "created")

    def body(self) -> dict:
        """The stored JSON body (the annotator and time are columns of their own)."""
        return {k: v for k, v in asdict(self).items() if k not in self.STORE_ONLY}

    @property
    def label(self) -> str:
        """The outcome as one comparable label: the top response's index, or the pairwise choice."""
        if self.kind == "ranking":
            return str(self.ranks.index(1))
        return str(self.winner) if self.winner is not None else self.choice


def parse_task(obj, where: str) -> Task:
    """One task from its JSON object; `where` (file:line) names it in every error."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    tid = obj.get("id")
    if not isinstance(tid, str | int) or isinstance(tid, bool) or str(tid) == "":
        raise DataError(f"{where}: task has no \"id\" (a non-empty string or integer)")
    prompt = obj.get("prompt")
    if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in prompt)):
        raise DataError(f"{where}: task {tid}: \"prompt\" must be a non-empty string or a list of "
                        "{role, content} messages")
    responses = obj.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        n = len(responses) if isinstance(responses, list) else 0
        raise DataError(f"{where}: task {tid}: needs at least 2 responses to compare, has {n}")
    parsed = []
    for i, r in enumerate(responses):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not isinstance(r.get("model"), str) \
                or not r["model"]:
            raise DataError(f"{where}: task {tid}: responses[{i}] must be {{\"text\": str, \"model\": str}}")
        parsed.append(Response(r["text"], r["model"]))
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"{where}: task {tid}: \"meta\" must be an object")
    return Task(str(tid), prompt, parsed, meta)


def read_tasks(path: str | Path) -> list[Task]:
    """Every task of a tasks file, checked line by line: a malformed line, a bad task or a repeated id is
    a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such tasks file. Fix: rlhf feedback make-tasks writes one")
    tasks, seen = [], {}
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            task = parse_task(parse_jsonl_line(path, lineno, line), where)
            if task.id in seen:
                raise DataError(f"{where}: duplicate task id {task.id!r} (first at line {seen[task.id]})")
            seen[task.id] = lineno
            tasks.append(task)
    if not tasks:
        raise DataError(f"{path}: no tasks")
    return tasks


def write_tasks(tasks: list[Task], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(t.to_json()) + "\n" for t in tasks))
    tmp.replace(path)  # a reader never sees half a file
    return path


def tasks_from_responses(rows: list[dict], k: int = 2, seed: int = 0, where: str = "responses") -> list[Task]:
    """Group response rows {"prompt", "response", "model", optional "meta"} by prompt into tasks of up to
    k responses (in a seeded random order of their models); a prompt with fewer than 2 is dropped."""
    if k < 2:
        raise DataError(f"k={k}: a comparison needs at least 2 responses per task")
    by_prompt: dict[str, list[dict]] = {}
    for i, r in enumerate(rows):
        for key in ("prompt", "response", "model"):
            if key not in r:
                raise DataError(f"{where} row {i}: missing {key!r}")
        by_prompt.setdefault(json.dumps(r["prompt"], sort_keys=True), []).append(r)
    rng = random.Random(seed)
    tasks = []
    for group in by_prompt.values():
        if len(group) < 2:
            continue
        rng.shuffle(group)
        chosen = group[:k]
        tasks.append(Task(f"t{len(tasks):05d}", chosen[0]["prompt"],
                          [Response(r["response"], r["model"]) for r in chosen], dict(chosen[0].get("meta") or {})))
    if not tasks:
        raise DataError(f"{where}: no prompt has 2 or more responses to compare")
    return tasks
