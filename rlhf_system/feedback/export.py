"""Votes -> our preference formats, which `rlhf train rm` and `rlhf train dpo` read as they are.

    rows = export_rows(store, fmt="pairwise", criterion="overall", keep_ties=False, keep_both_bad=False,
                       min_agreement=0.0)
    write_jsonl(rows, "prefs.jsonl")

pairwise: one row per judged pair: {"prompt", "chosen", "rejected", "margin", "annotator", "criterion",
"task_id", "chosen_model", "rejected_model"}; margin is 2 for "clearly better", 1 for "slightly" (and
for adjacent ranks; more for ranks further apart), 0 for a kept tie or both-bad pair (marked "tie" /
"both_bad"). A ranking vote gives every pair of its responses.
ranking: one row per vote: {"prompt", "responses", "ranks", "annotator", "task_id"}; a pairwise vote
becomes two responses ranked 1, 2 (or 1, 1 for a tie).

Agreement filter: a task's label is its majority judgement (the winner, or tie / both bad; for a ranking
vote, its top response); with min_agreement > 0 only tasks where at least that share of votes agree with
the majority are exported (a task seen once agrees with itself).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from rlhf_system.data.sources import DataError
from rlhf_system.feedback.store import Store
from rlhf_system.feedback.tasks import Task, Vote

MARGIN = {"clearly": 2.0, "slightly": 1.0}


def label(vote: Vote, criterion: str) -> object:
    """What a vote says on one criterion: a response index, "tie", "both_bad", or None (not judged)."""
    if criterion != "overall":
        return vote.criteria.get(criterion)
    if vote.kind == "ranking":
        return vote.ranks.index(1)
    return vote.winner if vote.winner is not None else vote.choice


def agreement(votes: list[Vote], criterion: str) -> float:
    labels = [x for x in (label(v, criterion) for v in votes) if x is not None]
    if not labels:
        return 0.0
    return Counter(map(str, labels)).most_common(1)[0][1] / len(labels)


def _pair(task: Task, vote: Vote, win: int, lose: int, margin: float, criterion: str, **flags) -> dict:
    r = task.responses
    return {"prompt": task.prompt, "chosen": r[win].text, "rejected": r[lose].text, "margin": margin,
            "annotator": vote.annotator, "criterion": criterion, "task_id": task.id,
            "chosen_model": r[win].model, "rejected_model": r[lose].model, **flags}


def pairwise_rows(task: Task, vote: Vote, criterion: str, keep_ties: bool, keep_both_bad: bool) -> list[dict]:
    if vote.kind == "ranking":
        if criterion != "overall":
            return []
        ranks = vote.ranks
        return [_pair(task, vote, i, j, float(ranks[j] - ranks[i]), criterion)
                for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]
    said = label(vote, criterion)
    if said is None:
        return []
    if said in ("tie", "both_bad"):
        keep = keep_ties if said == "tie" else keep_both_bad
        return [_pair(task, vote, 0, 1, 0.0, criterion, **{said: True})] if keep else []
    margin = MARGIN[vote.strength] if criterion == "overall" else 1.0
    return [_pair(task, vote, said, 1 - said, margin, criterion)]


def ranking_row(task: Task, vote: Vote) -> dict | None:
    if vote.kind == "ranking":
        ranks = vote.ranks
    elif vote.winner is not None:
        ranks = [1 if i == vote.winner else 2 for i in range(2)]
    elif vote.choice == "tie":
        ranks = [1, 1]
    else:
        return None  # both bad: no order to give
    return {"prompt": task.prompt, "responses": [r.text for r in task.responses], "ranks": ranks,
            "annotator": vote.annotator, "task_id": task.id}


def export_rows(store: Store, fmt: str = "pairwise", criterion: str = "overall", keep_ties: bool = False,
                keep_both_bad: bool = False, min_agreement: float = 0.0) -> tuple[list[dict], dict]:
    """(rows, stats). An empty store is a DataError."""
    votes = store.votes()
    if not votes:
        raise DataError(f"{store.path}: no votes to export yet")
    by_task: dict[str, list[dict]] = defaultdict(list)
    for v in votes:
        by_task[v.task_id].append(v)
    rows, dropped = [], 0
    for task_id, task_votes in by_task.items():
        if min_agreement > 0 and agreement(task_votes, criterion) < min_agreement:
            dropped += 1
            continue
        task = store.task(task_id)
        for v in task_votes:
            if fmt == "pairwise":
                rows += pairwise_rows(task, v, criterion, keep_ties, keep_both_bad)
            elif (row := ranking_row(task, v)) is not None:
                rows.append(row)
    if not rows:
        raise DataError(f"{store.path}: {len(votes)} votes, but none left to export (ties / both-bad dropped, or "
                        f"min_agreement={min_agreement} removed {dropped} tasks)")
    return rows, {"votes": len(votes), "tasks": len(by_task), "tasks_below_agreement": dropped, "rows": len(rows)}


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path
