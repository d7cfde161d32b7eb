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
