"""Where tasks and votes live: one SQLite file in WAL mode, safe for concurrent annotators and for a
server killed at any moment.

    store = Store("feedback.db")
    store.add_tasks(tasks)                       # idempotent; a changed task under a stored id is an error
    task = store.next_task("alice", overlap=2)   # alice's task now (leased to her), or None when done
    new = store.record("alice", vote)            # False when this vote_id was already stored (a retry)

Durability: every vote is one transaction, committed with synchronous=FULL before the server answers,
so an acknowledged vote survives a SIGKILL (and a power cut). Idempotency: a vote carries the client's
vote_id; (annotator, vote_id) is the primary key, so a retried request stores nothing twice, and an
annotator has at most one vote per task. Each request thread uses its own connection; writers queue on
SQLite's lock (busy timeout) instead of failing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from rlhf_system.data.sources import DataError
from rlhf_system.feedback.tasks import Task, Vote, parse_task

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    annotator TEXT NOT NULL, vote_id TEXT NOT NULL, task_id TEXT NOT NULL REFERENCES tasks(id),
    body TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (annotator, vote_id));
CREATE UNIQUE INDEX IF NOT EXISTS one_vote_per_task ON votes (annotator, task_id);
CREATE INDEX IF NOT EXISTS votes_by_task ON votes (task_id);
CREATE TABLE IF NOT EXISTS leases (
    annotator TEXT PRIMARY KEY, task_id TEXT NOT NULL REFERENCES tasks(id), leased REAL NOT NULL);
"""
LEASE_S = 1800.0  # a task handed out and not voted on within this goes back to the pool


class VoteConflict(ValueError):
    """This annotator already voted on the task under another vote_id."""


class Store:
    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        con = self._con()
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                  check_same_thread=False)
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
        return con

    # ------------------------------------------------------------------------------------ tasks
    def add_tasks(self, tasks: list[Task], source: str = "tasks") -> int:
        """Insert the tasks not stored yet (in order); returns how many were new. A stored id whose task
        differs is a DataError naming it, and nothing is written."""
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            new = 0
            for t in tasks:
                body = json.dumps(t.to_json(), sort_keys=True)
                row = con.execute("SELECT body FROM tasks WHERE id = ?", (t.id,)).fetchone()
                if row is None:
                    con.execute("INSERT INTO tasks (id, body) VALUES (?, ?)", (t.id, body))
                    new += 1
                elif row[0] != body:
                    raise DataError(f"{source}: task {t.id!r} differs from the task stored under that id in "
                                    f"{self.path}. Fix: give changed tasks new ids")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return new

    def task(self, task_id: str) -> Task | None:
        row = self._con().execute("SELECT body FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else parse_task(json.loads(row[0]), f"{self.path} task {task_id}")

    def count_tasks(self) -> int:
        return self._con().execute("SELECT COUNT(*) FROM tasks").fetchone()[0]

    def next_task(self, annotator: str, overlap: int, lease_s: float = LEASE_S) -> Task | None:
        """The task this annotator holds (a reload or a restarted server shows it again), else the first
        task in file order that they have not voted on and that fewer than `overlap` others have voted on
        or hold. Handing it out leases it to them, so concurrent annotators get different tasks."""
        con = self._con()
        now = time.time()
        con.execute("BEGIN IMMEDIATE")
        try:
            held = con.execute("SELECT t.body FROM leases l JOIN tasks t ON t.id = l.task_id WHERE l.annotator = ? "
                               "AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.annotator = ? AND v.task_id = l.task_id)",
                               (annotator, annotator)).fetchone()
            if held is not None:
                con.execute("UPDATE leases SET leased = ? WHERE annotator = ?", (now, annotator))
                con.execute("COMMIT")
                return parse_task(json.loads(held[0]), str(self.path))
            row = con.execute(
                "SELECT t.id, t.body FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM votes v WHERE v.task_id = t.id AND "
                "v.annotator = ?) AND (SELECT COUNT(*) FROM votes v WHERE v.task_id = t.id) + (SELECT COUNT(*) FROM "
                "leases l WHERE l.task_id = t.id AND l.annotator != ? AND l.leased > ?) < ? ORDER BY t.seq LIMIT 1",
                (annotator, annotator, now - lease_s, overlap)).fetchone()
            if row is None:
                con.execute("DELETE FROM leases WHERE annotator = ?", (annotator,))
            else:
                con.execute("INSERT OR REPLACE INTO leases (annotator, task_id, leased) VALUES (?, ?, ?)",
                            (annotator, row[0], now))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return None if row is None else parse_task(json.loads(row[1]), str(self.path))

    # ------------------------------------------------------------------------------------ votes
    def record(self, annotator: str, vote: Vote) -> bool:
        """Store one vote (already checked against its task); True if stored now, False if this vote_id
        was stored before (a retried request). Another vote by the same annotator on the same task is a
        VoteConflict."""
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            seen = con.execute("SELECT task_id FROM votes WHERE annotator = ? AND vote_id = ?",
                               (annotator, vote.vote_id)).fetchone()
            if seen is not None:
                con.execute("ROLLBACK")
                return False
            try:
                con.execute("INSERT INTO votes (annotator, vote_id, task_id, body, created) VALUES (?, ?, ?, ?, ?)",
                            (annotator, vote.vote_id, vote.task_id, json.dumps(vote.body(), sort_keys=True),
                             time.time()))
            except sqlite3.IntegrityError:
                raise VoteConflict(f"{annotator} already voted on task {vote.task_id}") from None
            con.execute("DELETE FROM leases WHERE annotator = ? AND task_id = ?", (annotator, vote.task_id))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return True

    def votes(self) -> list[Vote]:
        """Every vote, oldest first."""
        rows = self._con().execute("SELECT annotator, task_id, created, body FROM votes ORDER BY created, rowid")
        return [Vote(**{**json.loads(body), "task_id": t}, annotator=a, created=c) for a, t, c, body in rows]

    def progress(self) -> dict[str, int]:
        """Votes per annotator."""
        return dict(self._con().execute("SELECT annotator, COUNT(*) FROM votes GROUP BY annotator").fetchall())
