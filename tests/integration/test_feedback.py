"""`rlhf feedback serve` as a real server process (uvicorn on loopback), driven over HTTP:
20 concurrent simulated annotators cast 1,000 votes (every one exported once, a retried request stored
once); the server is SIGKILLed under load and restarted (every acknowledged vote survives); and the
export trains a reward model with `rlhf train rm`."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from rlhf_system.feedback.simulate import rule_judge, simulate
from rlhf_system.feedback.store import Store
from rlhf_system.feedback.tasks import Response, Task, read_tasks, write_tasks
from tests.integration.conftest import REPO, rlhf
from tests.integration.ray_nodes import free_port

pytestmark = pytest.mark.integration


def synthetic_tasks(pref_file: Path, n: int, seed: int = 0) -> list[Task]:
    """Pairwise tasks from the synthetic preference pairs: the chosen response ("good") against the
    rejected one ("bad"), in a random order; meta carries what the rule verifier reads."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in pref_file.read_text().splitlines()][:n]
    tasks = []
    for i, r in enumerate(rows):
        pair = [Response(r["chosen"], "good"), Response(r["rejected"], "bad")]
        rng.shuffle(pair)
        meta = {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")} | {"answer": r["chosen"]}
        tasks.append(Task(f"t{i:05d}", r["prompt"], pair, meta))
    return tasks


class Server:
    """`rlhf feedback serve` in a process of its own; start() waits (with a deadline) until it answers."""

    def __init__(self, tmp: Path, tasks: Path, names: list[str], overlap: int = 1):
        self.db, self.tokens, self.tasks = tmp / "feedback.db", tmp / "tokens.json", tasks
        self.names, self.overlap, self.port = names, overlap, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, deadline_s: float = 120) -> "Server":
        cmd = [sys.executable, "-m", "rlhf_system.cli", "feedback", "serve", "--tasks", str(self.tasks),
               "--db", str(self.db), "--tokens", str(self.tokens), "--annotators", ",".join(self.names),
               "--port", str(self.port), "--overlap", str(self.overlap)]
        self.log = open(self.db.with_suffix(".log"), "a")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.db.with_suffix(".log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/admin", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the feedback server did not answer within {deadline_s}s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def access(self) -> dict[str, str]:
        return json.loads(self.tokens.read_text())["annotators"]


def collect_and_export(tmp_path: Path, tasks_path: Path, names: list[str], out: Path, **sim) -> Server:
    """Serve the tasks, let simulated annotators (rule verifier) vote, stop, `rlhf feedback export`."""
    tasks = {t.id: t for t in read_tasks(tasks_path)}
    server = Server(tmp_path, tasks_path, names).start()
    try:
        simulate(server.url, server.access(), tasks, rule_judge("synthetic"), **sim)
    finally:
        server.stop()
    rlhf("feedback", "export", "--db", str(server.db), "--out", str(out))
    return server


NAMES = [f"ann{i:02d}" for i in range(20)]


@pytest.fixture
def tasks_file(synthetic_dir, tmp_path):
    return write_tasks(synthetic_tasks(synthetic_dir / "pref_train.jsonl", 1000), tmp_path / "tasks.jsonl")


def test_twenty_annotators_cast_a_thousand_votes_each_exported_once(tasks_file, tmp_path):
    server = Server(tmp_path, tasks_file, NAMES).start()
    try:
        tasks = {t.id: t for t in read_tasks(tasks_file)}
        t0 = time.perf_counter()
        results = simulate(server.url, server.access(), tasks, rule_judge("synthetic"), noise=0.1, seed=0)
        seconds = time.perf_counter() - t0
        assert sum(r["votes"] for r in results.values()) == 1000, results
        assert all(r["votes"] > 0 for r in results.values())  # all 20 worked at once
        # A request retried after its answer was lost: the same vote_id again stores nothing.
        access = server.access()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            store = Store(server.db)
            for v in random.Random(0).sample(store.votes(), 25):
                name = v.annotator
                body = {"vote_id": v.vote_id, "task_id": v.task_id, "shown": v.shown, "choice": v.choice}
                if v.strength:
                    body["strength"] = v.strength
                r = c.post(f"/api/{name}/vote", json=body, headers={"Authorization": f"Bearer {access[name]}"})
                assert r.status_code == 200 and r.json()["stored"] is False, r.text
    finally:
        server.stop()
    out = tmp_path / "prefs.jsonl"
    stats = json.loads(rlhf("feedback", "export", "--db", str(server.db), "--out", str(out), "--keep-ties",
                            "--keep-both-bad").stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["votes"] == 1000 and len(rows) == 1000
    assert len({r["task_id"] for r in rows}) == 1000  # every task once: no vote lost, none duplicated
    acked = {(n, v) for n, r in results.items() for v in r["acked"]}
    assert acked == {(v.annotator, v.vote_id) for v in Store(server.db).votes()}
    print(f"1000 votes by 20 annotators in {seconds:.1f}s")


def test_votes_survive_a_sigkill_under_load(tasks_file, tmp_path):
    tasks = {t.id: t for t in read_tasks(tasks_file)}
    names = NAMES[:8]
    server = Server(tmp_path, tasks_file, names).start()
    results: dict = {}
    worker = threading.Thread(target=lambda: results.update(
        simulate(server.url, server.access(), tasks, rule_judge("synthetic"), seed=1, max_votes=60,
                 timeout_s=120)), daemon=True)
    try:
        worker.start()
        end = time.monotonic() + 120
        while len(Store(server.db).votes()) < 150:  # mid-load: votes are arriving from 8 annotators
            assert time.monotonic() < end and worker.is_alive(), "the simulated annotators stalled"
            time.sleep(0.05)
        server.kill()
        killed_at = len(Store(server.db).votes())
        server.start()  # same database, same port: the annotators' retries reach the new process
        worker.join(timeout=300)
        assert not worker.is_alive()
    finally:
        server.stop()
    assert sum(r["votes"] for r in results.values()) == 8 * 60, results
    stored = {(v.annotator, v.vote_id) for v in Store(server.db).votes()}
    acked = {(n, v) for n, r in results.items() for v in r["acked"]}
    assert acked <= stored and len(stored) == 8 * 60  # every acknowledged vote survived; nothing twice
    assert 0 < killed_at < 8 * 60


def test_export_trains_a_reward_model(tasks_file, tmp_path, small_model):
    """Simulated votes on 64 tasks -> `rlhf feedback export` -> `rlhf train rm` reads it as it is (2 steps)."""
    out = tmp_path / "prefs.jsonl"
    collect_and_export(tmp_path, tasks_file, NAMES[:2], out, seed=2, max_votes=32)
    run = tmp_path / "rm"
    rlhf("train", "rm", "--config", "configs/rm/tiny-cpu.yaml", f"model.path={small_model['policy']}",
         f"run_dir={run}", f"data.train=[{{path: {out}}}]", f"data.eval=[{{path: {out}}}]", "train.max_steps=2",
         "train.global_batch_size=8", "train.micro_batch_size=8", "logging.console=false", "checkpoint.export_hf=false")
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 2 and "eval_accuracy" in result["final"]


def test_a_bad_tasks_file_is_one_line_and_keeps_the_database(tasks_file, tmp_path):
    server = Server(tmp_path, tasks_file, NAMES[:1]).start()
    server.stop()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tasks_file.read_text().splitlines()[0] + "\n" + '{"id": "x", "prompt": "p", "responses": []}\n')
    out = subprocess.run([sys.executable, "-m", "rlhf_system.cli", "feedback", "serve", "--tasks", str(bad), "--db",
                          str(server.db), "--tokens", str(server.tokens), "--port", str(free_port())],
                         cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: {bad}:2: task x: needs at least 2 responses to compare, has 0"
    assert Store(server.db).count_tasks() == 1000
    assert os.stat(server.tokens).st_mode & 0o077 == 0  # the tokens file is its owner's alone


def test_tasks_from_two_checkpoints_then_the_cli_annotators(small_model, kit_model, synthetic_dir, tmp_path):
    """The README's loop by its commands: make-tasks samples two checkpoints (HF generate here), serve,
    simulate, export."""
    tasks_path = tmp_path / "tasks.jsonl"
    made = json.loads(rlhf("feedback", "make-tasks", "--prompts", str(synthetic_dir / "rl_test_seen.jsonl"),
                           "--limit", "6", "--models", f"small={small_model['policy']},kit={kit_model['policy']}",
                           "--backend", "hf", "--max-new-tokens", "8", "--out", str(tasks_path)).stdout)
    assert made == {"tasks": 6, "pairwise": 6, "ranking": 0, "out": str(tasks_path)}
    made_tasks = read_tasks(tasks_path)
    assert all({r.model for r in t.responses} == {"small", "kit"} and "answer" in t.meta for t in made_tasks)
    server = Server(tmp_path, tasks_path, ["alice", "bob"]).start()
    try:
        out = json.loads(rlhf("feedback", "simulate", "--url", server.url, "--tokens", str(server.tokens),
                              "--tasks", str(tasks_path), "--noise", "0.1").stdout)
    finally:
        server.stop()
    assert out["votes"] == 6 and set(out["annotators"]) == {"alice", "bob"}
    prefs = tmp_path / "prefs.jsonl"
    stats = json.loads(rlhf("feedback", "export", "--db", str(server.db), "--out", str(prefs), "--keep-ties",
                            "--keep-both-bad").stdout)
    assert stats["votes"] == 6 and stats["rows"] == 6
    report = json.loads(rlhf("feedback", "report", "--db", str(server.db), "--out", str(tmp_path / "report"),
                             "--bootstrap", "50").stdout)
    assert report["votes"] == 6 and set(report["models"]) <= {"small", "kit"}
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Feedback report")
    assert (tmp_path / "report" / "speed.png").stat().st_size > 1000


def test_reward_model_on_noisy_simulated_feedback_matches_clean_pairs(sft_run, synthetic_dir, tmp_path):
    """Learning: 600 synthetic pairs become tasks; a simulated annotator votes on all of them with the rule
    verifier and 10% noise (a random judgement instead); the export (ties and both-bad dropped) trains a
    reward model. One annotator, so that which votes the noise hits does not depend on how threads are
    scheduled: the run is the same every time.
    A second one trains on the clean synthetic pairs of the same exported tasks (the same number of
    pairs). Both are scored on the 200 held-out synthetic pairs: the feedback-trained one must be within
    0.05 of the clean one (measured: see the printed line)."""
    tasks_path = write_tasks(synthetic_tasks(synthetic_dir / "pref_train.jsonl", 600), tmp_path / "tasks.jsonl")
    tasks = {t.id: t for t in read_tasks(tasks_path)}
    feedback = tmp_path / "feedback.jsonl"
    collect_and_export(tmp_path, tasks_path, NAMES[:1], feedback, noise=0.1, seed=3)
    exported = [json.loads(line) for line in feedback.read_text().splitlines()]
    flipped = sum(r["chosen_model"] == "bad" for r in exported)
    clean = tmp_path / "clean.jsonl"
    originals = {t.id: t for t in tasks.values()}
    clean.write_text("".join(json.dumps({"prompt": originals[r["task_id"]].prompt,
                                         "chosen": next(x.text for x in originals[r["task_id"]].responses if x.model == "good"),
                                         "rejected": next(x.text for x in originals[r["task_id"]].responses if x.model == "bad")})
                             + "\n" for r in exported))
    accuracy = {}
    for name, data in (("feedback", feedback), ("clean", clean)):
        run = tmp_path / f"rm-{name}"
        rlhf("train", "rm", "--config", "configs/rm/tiny-cpu.yaml", f"model.path={sft_run / 'hf'}", f"run_dir={run}",
             f"data.train=[{{path: {data}}}]", f"data.eval=[{{path: {synthetic_dir / 'pref_test.jsonl'}}}]",
             "train.epochs=2", "logging.console=false", "checkpoint.export_hf=false", "train.max_eval_samples=200")
        accuracy[name] = json.loads((run / "result.json").read_text())["final"]["eval_accuracy"]
    print(f"held-out pair accuracy: simulated feedback (10% noise, {len(exported)} pairs, {flipped} flipped) "
          f"{accuracy['feedback']:.3f}, clean pairs {accuracy['clean']:.3f}")
    assert 500 <= len(exported) <= 600 and 0 < flipped < 0.06 * len(exported)  # the noise reached the labels
    assert accuracy["clean"] > 0.7  # it learned at all (chance is 0.5)
    assert abs(accuracy["feedback"] - accuracy["clean"]) <= 0.05, accuracy
