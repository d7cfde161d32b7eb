"""`rlhf feedback serve`: load the tasks into the store, then serve the app with uvicorn.

The tokens file (JSON: {"admin": TOKEN, "annotators": {NAME: TOKEN}}) is made on first use with a random
token per annotator named by --annotators, readable by its owner only; later runs read it, adding any new
names. The server binds 127.0.0.1 unless told otherwise. It prints each annotator's link to stderr: the
token sits in the URL's fragment, which the browser keeps to itself.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from rlhf_system.data.sources import DataError
from rlhf_system.feedback.app import Access, make_app
from rlhf_system.feedback.store import Store
from rlhf_system.feedback.tasks import read_tasks


def access_file(path: str | Path, names: list[str]) -> Access:
    """Read the tokens file, adding a token for each name not in it yet (the file is created 0600)."""
    path = Path(path)
    if path.exists():
        try:
            access = Access.load(path)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a tokens file ({{\"admin\": ..., \"annotators\": {{name: token}}}}): {e}") from None
    else:
        access = Access({}, secrets.token_urlsafe(24))
    new = [n for n in names if n not in access.annotators]
    for n in new:
        if not n or "/" in n:
            raise DataError(f"--annotators: bad annotator name {n!r}")
        access.annotators[n] = secrets.token_urlsafe(24)
    if new or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"admin": access.admin, "annotators": access.annotators}, f, indent=2)
        path.with_name(path.name + ".tmp").replace(path)
    if not access.annotators:
        raise DataError(f"{path}: no annotators. Fix: --annotators alice,bob")
    return access


def serve(tasks: str | None, db: str, tokens: str, names: list[str], host: str, port: int, overlap: int,
          max_body: int) -> None:
    import uvicorn

    store = Store(db)
    if tasks:
        added = store.add_tasks(read_tasks(tasks), tasks)  # a bad tasks file stops here, before serving
        print(f"[feedback] {added} new tasks from {tasks}; {store.count_tasks()} in {db}", file=sys.stderr)
    if store.count_tasks() == 0:
        raise DataError(f"{db}: no tasks. Fix: --tasks tasks.jsonl (rlhf feedback make-tasks writes one)")
    access = access_file(tokens, names)
    for name, token in sorted(access.annotators.items()):
        print(f"[feedback] {name}: http://{host}:{port}/annotate/{name}#token={token}", file=sys.stderr)
    print(f"[feedback] admin: http://{host}:{port}/admin#token={access.admin}", file=sys.stderr)
    uvicorn.run(make_app(store, access, overlap, max_body), host=host, port=port, log_level="warning")


class Background:
    """`rlhf feedback serve` in a child process, for scripts (the demo's feedback stage):

        with Background(tasks, db, tokens, ["a1", "a2"], overlap=2) as url:
            ...   # http://127.0.0.1:PORT answers

    Entering waits, with a deadline, until the server answers; leaving stops it (SIGTERM, then SIGKILL)."""

    def __init__(self, tasks: str | Path, db: str | Path, tokens: str | Path, names: list[str], overlap: int = 1,
                 deadline_s: float = 120.0):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "rlhf_system.cli", "feedback", "serve", "--tasks", str(tasks), "--db", str(db),
                    "--tokens", str(tokens), "--annotators", ",".join(names), "--port", str(self.port),
                    "--overlap", str(overlap)]
        self.deadline_s, self.proc = deadline_s, None

    def __enter__(self) -> str:
        import subprocess
        import time

        import httpx

        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL)
        end = time.monotonic() + self.deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the feedback server exited with status {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/admin", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"the feedback server did not answer within {self.deadline_s:g}s")

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
