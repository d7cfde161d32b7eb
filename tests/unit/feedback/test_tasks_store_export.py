"""Tasks files (one-line errors), the SQLite store (resume, idempotency, a changed task refused) and the
export into our preference formats, which the data pipeline then reads as pairwise / ranking sources."""

import dataclasses
import json

import pytest

from rlhf_system.config import DataConfig, DataSource
from rlhf_system.data.build import build_dataset
from rlhf_system.data.sources import DataError
from rlhf_system.feedback.app import VoteIn, normalise, shown_order
from rlhf_system.feedback.export import export_rows, write_jsonl
from rlhf_system.feedback.store import Store, VoteConflict
from rlhf_system.feedback.tasks import read_tasks, tasks_from_responses, write_tasks
from tests.unit.feedback.conftest import pair_task, rank_task

GOOD = {"id": "a", "prompt": "q", "responses": [{"text": "x", "model": "m1"}, {"text": "y", "model": "m2"}]}


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "prompt": "q", "responses": [{"text": "x", "model": "m"}]}', "needs at least 2 responses"),
    ('{"prompt": "q", "responses": []}', 'task has no "id"'),
    ('{"id": "a", "prompt": "q", "responses": [{"text": "x", "model": "m"}, {"text": "y", "model": "n"}]}',
     "duplicate task id 'a' \\(first at line 1\\)"),
    ('{"id": "c", "prompt": "q", "responses": [{"text": "x"}, {"text": "y", "model": "n"}]}',
     "responses\\[0\\] must be"),
    ('{"id": "d", "prompt": "q", ', "malformed JSON line"),
])
def test_bad_tasks_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "tasks.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"tasks.jsonl:2: .*{message}"):
        read_tasks(p)


def test_tasks_round_trip_and_grouping(tmp_path):
    rows = [{"prompt": f"p{i % 3}", "response": f"r{i}", "model": f"m{i % 2}", "meta": {"i": i % 3}} for i in range(9)]
    tasks = tasks_from_responses(rows, k=3, seed=1)
    assert len(tasks) == 3 and all(len(t.responses) == 3 and t.kind == "ranking" for t in tasks)
    assert read_tasks(write_tasks(tasks, tmp_path / "t.jsonl")) == tasks
    with pytest.raises(DataError, match="no prompt has 2 or more responses"):
        tasks_from_responses([{"prompt": "p", "response": "r", "model": "m"}])


def vote(store, annotator, task, **fields):
    shown = shown_order(annotator, task)
    v = normalise(VoteIn(vote_id=f"{annotator}-{task.id}", task_id=task.id, shown=shown, **fields), task, shown)
    return store.record(annotator, v)


def test_store_resumes_where_each_annotator_was_and_keeps_what_it_has(tmp_path):
    db = tmp_path / "fb.db"
    store = Store(db)
    tasks = [pair_task(i) for i in range(3)]
    assert store.add_tasks(tasks) == 3 and store.add_tasks(tasks) == 0  # loading again adds nothing
    vote(store, "alice", tasks[0], choice="tie")
    reopened = Store(db)  # a restarted server
    assert reopened.next_task("alice", overlap=1).id == "t001" and reopened.next_task("bob", overlap=2).id == "t000"
    changed = [pair_task(1, good="9")]
    with pytest.raises(DataError, match="task 't001' differs from the task stored"):
        reopened.add_tasks(changed + [pair_task(7)])
    assert reopened.count_tasks() == 3 and len(reopened.votes()) == 1  # nothing written, nothing lost
    assert vote(reopened, "alice", tasks[0], choice="tie") is False  # the same vote_id again
    with pytest.raises(VoteConflict):
        reopened.record("alice", dataclasses.replace(reopened.votes()[0], vote_id="another"))


def test_export_pairwise_and_ranking_read_by_the_data_pipeline(tmp_path, bpe_tokenizer):
    store = Store(tmp_path / "fb.db")
    store.add_tasks([pair_task(i) for i in range(3)] + [rank_task(0)])
    t0, t1, t2, r0 = (store.task(i) for i in ("t000", "t001", "t002", "r000"))
    good = lambda t, a: "A" if t.responses[shown_order(a, t)[0]].model == "sft" else "B"
    vote(store, "alice", t0, choice=good(t0, "alice"), strength="clearly")
    vote(store, "alice", t1, choice="tie")
    vote(store, "alice", t2, choice="both_bad")
    vote(store, "alice", r0, ranking=[shown_order("alice", r0).index(i) for i in (2, 0, 1)])
    rows, stats = export_rows(store)
    assert stats == {"votes": 4, "tasks": 4, "tasks_below_agreement": 0, "rows": 4}  # 1 pair + 3 from the ranking
    first = rows[0]
    assert (first["chosen"], first["rejected"], first["margin"], first["chosen_model"]) == ("7", "8", 2.0, "sft")
    assert {(r["chosen"], r["rejected"], r["margin"]) for r in rows[1:]} == {("c", "a", 1.0), ("c", "b", 2.0),
                                                                             ("a", "b", 1.0)}
    kept, _ = export_rows(store, keep_ties=True, keep_both_bad=True)
    assert sum(r.get("tie", False) for r in kept) == 1 and sum(r.get("both_bad", False) for r in kept) == 1
    ranked, _ = export_rows(store, fmt="ranking")
    assert [r["ranks"] for r in ranked] == [[1, 2], [1, 1], [2, 3, 1]]  # both-bad has no order
    for fmt_rows, want in ((rows, "pairwise"), (ranked, "ranking")):
        path = write_jsonl(fmt_rows, tmp_path / f"{want}.jsonl")
        c = DataConfig(train=[DataSource(path=str(path))])
        ds, built = build_dataset("preference", c, c.train, bpe_tokenizer)
        assert built.formats[str(path)] == want and len(ds) >= 3


def test_min_agreement_keeps_tasks_whose_votes_agree(tmp_path):
    store = Store(tmp_path / "fb.db")
    store.add_tasks([pair_task(0), pair_task(1)])
    t0, t1 = store.task("t000"), store.task("t001")
    for a in ("a1", "a2", "a3"):
        want = "sft" if a != "a3" else "base"  # 2 of 3 agree on t000
        pick = "A" if t0.responses[shown_order(a, t0)[0]].model == want else "B"
        vote(store, a, t0, choice=pick, strength="slightly")
        pick = "A" if t1.responses[shown_order(a, t1)[0]].model == "sft" else "B"  # all agree on t001
        vote(store, a, t1, choice=pick, strength="slightly")
    rows, stats = export_rows(store, min_agreement=0.8)
    assert {r["task_id"] for r in rows} == {"t001"} and stats["tasks_below_agreement"] == 1
    assert len(export_rows(store, min_agreement=0.6)[0]) == 6


def test_export_of_an_empty_store_is_one_line(tmp_path):
    with pytest.raises(DataError, match="no votes to export yet"):
        export_rows(Store(tmp_path / "empty.db"))



def test_cli_errors_are_one_line(tmp_path, capsys):
    """Bad input to `rlhf feedback`: one line on stderr, exit status 2, before any sampling or serving."""
    from rlhf_system.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "q"}\n')
    cases = [
        (["make-tasks", "--prompts", str(prompts), "--models", "nope=/no/such/model", "--out", str(tmp_path / "t.jsonl")],
         "--models nope: '/no/such/model' is not a model folder"),
        (["make-tasks", "--prompts", str(prompts), "--out", str(tmp_path / "t.jsonl")], "give either --responses"),
        (["make-tasks", "--prompts", str(prompts), "--models", "nope=/no/such/model", "--samples", "2",
          "--temperature", "0", "--out", str(tmp_path / "t.jsonl")], "greedy decoding gives the same response"),
        (["make-tasks", "--prompts", str(prompts), "--models", "nope=/no/such/model", "--temperature", "-1",
          "--out", str(tmp_path / "t.jsonl")], "a temperature is >= 0"),
        (["export", "--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "x.jsonl")], "no such feedback database"),
        (["report", "--db", str(Store(tmp_path / "empty.db").path), "--out", str(tmp_path / "r")], "no votes to report"),
        (["serve", "--db", str(tmp_path / "empty2.db"), "--tokens", str(tmp_path / "tok.json")], "no tasks"),
    ]
    for argv, needle in cases:
        rc = main(["feedback", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "t.jsonl").exists() and not (tmp_path / "x.jsonl").exists()
