import json

import pytest

from rlhf_system.feedback.app import Access, make_app
from rlhf_system.feedback.store import Store
from rlhf_system.feedback.tasks import Response, Task


def pair_task(i: int, good: str = "7", bad: str = "8") -> Task:
    return Task(f"t{i:03d}", f"Add 3 and {i}.", [Response(good, "sft"), Response(bad, "base")],
                {"task": "add", "answer": good, "family": "arithmetic"})


def rank_task(i: int) -> Task:
    return Task(f"r{i:03d}", "Rank these.", [Response(t, m) for t, m in (("a", "m1"), ("b", "m2"), ("c", "m3"))])


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "fb.db")
    s.add_tasks([pair_task(i) for i in range(4)] + [rank_task(0)])
    return s


@pytest.fixture
def access():
    return Access({"alice": "tok-alice", "bob": "tok-bob"}, "tok-admin")


@pytest.fixture
def client(store, access):
    from fastapi.testclient import TestClient

    return TestClient(make_app(store, access, overlap=2, max_body=4096))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
