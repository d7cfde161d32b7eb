"""Data as real files come (issue 26): extra columns of several types beside the format's keys (strings,
numbers, nested objects, nulls), and rows that disagree on which extras they carry (the first row has
none, so a reader that infers columns from it meets new ones later)."""

import json
from pathlib import Path


def extras(i: int) -> dict:
    if i == 0:
        return {}
    pick = [{"flaw": "typo"}, {"score": 0.5 * i, "id": i}, {"meta": {"source": "web", "tags": ["a", None]}},
            {"note": None}, {"flaw": None, "nested": [{"k": i}]}]
    return pick[i % len(pick)]


def untidy_copy(src: Path, dst: Path) -> Path:
    """Copy every JSONL file of `src` into `dst` with extras(i) added to row i."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        (dst / f.name).write_text("".join(json.dumps(r | extras(i)) + "\n" for i, r in enumerate(rows)))
    return dst
