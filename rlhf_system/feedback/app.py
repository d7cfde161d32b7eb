"""The annotation web app (FastAPI): annotators compare and rank responses; votes go to the Store.

    app = make_app(store, Access.load("tokens.json"), overlap=2)    # served by uvicorn (serve.py)

Pages: /annotate/NAME (one annotator; the token rides in the URL fragment, which browsers never send to
the server, and the page sends it as a Bearer header) and /admin (progress of everyone). The page is
static HTML and a little plain JS that puts model text in with textContent, so a response containing
<script> is shown as text. API (JSON, every call needs `Authorization: Bearer TOKEN`):

    GET  /api/NAME/next    the next task: prompt, responses in the order shown to NAME, progress
    POST /api/NAME/vote    one vote (its vote_id makes a retry harmless); returns whether it was new
    GET  /api/admin/progress   votes per annotator (the admin token only)

A token opens only its own annotator's routes; request bodies over `max_body` bytes are refused before
they are read in full. The order of the responses is a seeded shuffle per (annotator, task), recorded with
the vote, so position bias can be measured and a reload shows the same order. Model names are never sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from rlhf_system.feedback.store import Store, VoteConflict
from rlhf_system.feedback.tasks import Task, Vote

WEB = Path(__file__).parent / "web"
CRITERIA = ("helpful", "honest", "harmless")


@dataclass
class Access:
    """Who may do what: annotator name -> token, and the admin's token."""

    annotators: dict[str, str]
    admin: str

    @classmethod
    def load(cls, path: str | Path) -> Access:
        doc = json.loads(Path(path).read_text())
        return cls(dict(doc["annotators"]), doc["admin"])

    def check(self, name: str, authorization: str | None) -> None:
        token = _bearer(authorization)
        want = self.annotators.get(name)
        if want is None:
            raise HTTPException(404, f"no annotator {name!r}")
        if not hmac.compare_digest(token.encode(), want.encode()):
            raise HTTPException(403, "this token does not belong to this annotator")

    def check_admin(self, authorization: str | None) -> None:
        if not hmac.compare_digest(_bearer(authorization).encode(), self.admin.encode()):
            raise HTTPException(403, "admin token required")


def _bearer(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer ") or not authorization[7:].strip():
        raise HTTPException(401, "missing token: send Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})
    return authorization[7:].strip()


def shown_order(annotator: str, task: Task) -> list[int]:
    """Response indices left to right as this annotator sees this task: a shuffle seeded by both, so it is
    random across annotators and tasks (against position bias) and the same on every reload."""
    seed = int.from_bytes(hashlib.sha256(f"{annotator}\0{task.id}".encode()).digest()[:8], "big")
    order = list(range(len(task.responses)))
    random.Random(seed).shuffle(order)
    return order


class VoteIn(BaseModel):
    """A vote as the page sends it: positions are display positions (0 = left / first shown)."""

    model_config = ConfigDict(extra="forbid")
    vote_id: str = Field(min_length=1, max_length=64)
    task_id: str = Field(min_length=1, max_length=200)
    shown: list[int]
    choice: Literal["A", "B", "tie", "both_bad"] | None = None      # pairwise
    strength: Literal["slightly", "clearly"] | None = None           # with A or B
    ranking: list[int] | None = None                                  # ranking: display positions, best first
    criteria: dict[Literal["helpful", "honest", "harmless"], Literal["A", "B", "tie"]] = Field(default_factory=dict)
    rationale: str = Field("", max_length=4000)
    unsafe: bool = False
    seconds: float | None = Field(None, ge=0, le=86400)


def normalise(vote: VoteIn, task: Task, shown: list[int]) -> Vote:
    """The stored form, in response indices of the task (not display positions); 422 when the vote does
    not fit the task."""
    if vote.shown != shown:
        raise HTTPException(422, f"task {task.id}: the order shown differs from the order served ({shown})")
    out = Vote(vote.vote_id, task.id, task.kind, shown, rationale=vote.rationale, unsafe=vote.unsafe,
               seconds=vote.seconds)
    pick = {"A": 0, "B": 1}
    if task.kind == "pairwise":
        if vote.choice is None or vote.ranking is not None:
            raise HTTPException(422, f"task {task.id} is pairwise: send choice (A, B, tie or both_bad)")
        if (vote.choice in pick) != (vote.strength is not None):
            raise HTTPException(422, "strength (slightly or clearly) goes with a choice of A or B, and only then")
        out.choice, out.strength = vote.choice, vote.strength
        out.winner = shown[pick[vote.choice]] if vote.choice in pick else None
        out.criteria = {c: (shown[pick[v]] if v in pick else "tie") for c, v in vote.criteria.items()}
    else:
        k = len(task.responses)
        if vote.ranking is None or sorted(vote.ranking) != list(range(k)) or vote.choice is not None:
            raise HTTPException(422, f"task {task.id} ranks {k} responses: send ranking, a permutation of 0..{k - 1}")
        ranks = [0] * k
        for place, position in enumerate(vote.ranking):
            ranks[shown[position]] = place + 1
        out.ranks = ranks
        if vote.criteria:
            raise HTTPException(422, "per-criterion judgements are pairwise only")
    return out


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, by Content-Length or as it streams."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await JSONResponse({"detail": f"request body over {self.limit} bytes"}, 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


def make_app(store: Store, access: Access, overlap: int = 1, max_body: int = 64 * 1024) -> FastAPI:
    app = FastAPI(title="rlhf feedback", docs_url=None, redoc_url=None, openapi_url=None)
    total = store.count_tasks()

    def progress(name: str) -> dict:
        return {"done": store.progress().get(name, 0), "total": total}

    @app.get("/annotate/{name}")
    def annotate_page(name: str):
        if name not in access.annotators:
            raise HTTPException(404, f"no annotator {name!r}")
        return FileResponse(WEB / "annotate.html", headers={"Cache-Control": "no-store"})

    @app.get("/admin")
    def admin_page():
        return FileResponse(WEB / "admin.html", headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    def static(name: str):
        if name not in ("annotate.js", "admin.js", "style.css"):
            raise HTTPException(404)
        return FileResponse(WEB / name)

    @app.get("/api/{name}/next")
    def next_task(name: str, authorization: str | None = Header(None)):
        access.check(name, authorization)
        task = store.next_task(name, overlap)
        if task is None:
            return {"task": None, "progress": progress(name)}
        shown = shown_order(name, task)
        return {"task": {"id": task.id, "kind": task.kind, "prompt": task.prompt_text(),
                         "responses": [task.responses[i].text for i in shown]},
                "shown": shown, "criteria": list(CRITERIA), "progress": progress(name)}

    @app.post("/api/{name}/vote")
    def vote(name: str, body: VoteIn, authorization: str | None = Header(None)):
        access.check(name, authorization)
        task = store.task(body.task_id)
        if task is None:
            raise HTTPException(404, f"no task {body.task_id!r}")
        try:
            new = store.record(name, normalise(body, task, shown_order(name, task)))
        except VoteConflict as e:
            raise HTTPException(409, str(e)) from None
        return {"stored": new, "progress": progress(name)}

    @app.get("/api/admin/progress")
    def admin_progress(authorization: str | None = Header(None)):
        access.check_admin(authorization)
        done = store.progress()
        return {"tasks": total, "overlap": overlap,
                "annotators": {n: {"done": done.get(n, 0)} for n in sorted(access.annotators)}}

    return BodyLimit(app, max_body)
