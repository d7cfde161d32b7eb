"""`rlhf serve-reward`: an HTTP reward server that scores (prompt, response, meta) batches with reward
rules, a reward model, or both.

    GET  /health -> {"ok": true, "rules": [...], "model": path|null}   (no auth, for liveness probes)
    POST /score  {"items": [{"prompt", "response", "meta"}, ...]} -> {"scores": [...]}
                 needs "Authorization: Bearer <token>"; the whole list is scored in one call.

It runs on uvicorn (an ASGI server made for production: an event loop, a listen backlog of 2048, keep-
alive) with a Starlette app. The order of the checks is the point: the token is compared (in constant
time) from the headers before a byte of the body is read; a Content-Length over --max-body-mb is refused
unread, and a body without one is read only up to the limit; a batch over --max-items is refused after
parsing. Scoring runs in a worker thread, so slow rules or a model do not stop the server answering.
Errors are JSON {"error": "..."}: 401 bad/missing token, 400 malformed body or a rule rejecting its
input, 413 too large, 404 unknown path, 500 a rule crashing, 503 over --max-concurrency connections.

With --reward-model, a sequence-classifier export (rlhf train rm's run_dir/hf) scores each item; the
prompt is the JSON list of turns PPO sends (plain text is one user turn). Model scores are added to the
rules' weighted sum with --model-weight; one request at a time uses the model.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import socket
import sys
import threading

from rlhf_system.rewards.registry import RewardError, RuleRewards

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024 * 1024  # bytes; a batch of thousands of long responses is well under this
MAX_ITEMS = 65536
BACKLOG = 2048


class _BadRequest(Exception):
    """A client error with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse_items(body: bytes, max_items: int = MAX_ITEMS) -> tuple[list[str], list[str], list[dict]]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _BadRequest(400, f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise _BadRequest(400, 'body must be a JSON object with an "items" list')
    if len(data["items"]) > max_items:
        raise _BadRequest(413, f"{len(data['items'])} items is over the {max_items}-item limit; send smaller batches")
    prompts, responses, metas = [], [], []
    for i, item in enumerate(data["items"]):
        if not isinstance(item, dict):
            raise _BadRequest(400, f"items[{i}] must be an object, got {type(item).__name__}")
        for field in ("prompt", "response"):
            if not isinstance(item.get(field), str):
                raise _BadRequest(400, f"items[{i}].{field} must be a string")
        meta = item.get("meta", {})
        if not isinstance(meta, dict):
            raise _BadRequest(400, f"items[{i}].meta must be an object")
        prompts.append(item["prompt"])
        responses.append(item["response"])
        metas.append(meta)
    return prompts, responses, metas


def _turns(prompt: str) -> list[dict]:
    """The prompt's turns: PPO sends them as a JSON list of {"role", "content"}; other text is one user turn."""
    try:
        turns = json.loads(prompt)
    except ValueError:
        return [{"role": "user", "content": prompt}]
    if isinstance(turns, list) and all(isinstance(t, dict) and {"role", "content"} <= set(t) for t in turns):
        return turns
    return [{"role": "user", "content": prompt}]


class Scorer:
    """Rules (weighted) plus, optionally, a reward model (times model_weight): one score per item."""

    def __init__(self, rules: RuleRewards | None, model=None, model_weight: float = 1.0):
        if rules is None and model is None:
            raise RewardError("the reward server needs --rules, --reward-model, or both")
        self.rules, self.model, self.model_weight = rules, model, model_weight
        self._model_lock = threading.Lock()  # one forward at a time: threads would only contend for cores

    def describe(self) -> dict:
        return {"rules": self.rules.names if self.rules else [], "model": self.model.path if self.model else None}

    def score(self, prompts: list[str], responses: list[str], metas: list[dict]) -> list[float]:
        total = self.rules.score(prompts, responses, metas) if self.rules else [0.0] * len(prompts)
        if self.model is not None and prompts:
            items = [{"messages": _turns(p), "response": r} for p, r in zip(prompts, responses)]
            with self._model_lock:
                rm = self.model.score(items)
            total = [t + self.model_weight * s for t, s in zip(total, rm)]
        return total


def make_app(scorer: Scorer, token: str, max_body: int = MAX_BODY, max_items: int = MAX_ITEMS,
             stats: dict | None = None):
    """The Starlette app; `stats` (requests, items) counts scored requests."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    if not token:
        raise RewardError("reward server needs a non-empty bearer token")
    expected = f"Bearer {token}".encode()
    stats = {"requests": 0, "items": 0} if stats is None else stats
    lock = threading.Lock()

    async def health(request):
        return JSONResponse({"ok": True, **scorer.describe()})

    async def read_limited(request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise _BadRequest(400, "Content-Length header is not a number")
            if int(length) > max_body:  # refused unread
                raise _BadRequest(413, f"body of {length} bytes is over the {max_body}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise _BadRequest(413, f"body is over the {max_body}-byte limit")
        return bytes(body)

    async def score(request):
        try:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # before the body: strangers cost us no reading
                raise _BadRequest(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            prompts, responses, metas = _parse_items(await read_limited(request), max_items)
            try:
                scores = await run_in_threadpool(scorer.score, prompts, responses, metas)
            except RewardError as e:  # the rule rejected this input (e.g. a meta key missing)
                raise _BadRequest(400, str(e)) from None
        except _BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except Exception as e:  # a crashing rule: report it, keep serving
            log.exception("reward scoring failed")
            return JSONResponse({"error": f"reward scoring failed: {e!r}"}, status_code=500)
        with lock:
            stats["requests"] += 1
            stats["items"] += len(scores)
        return JSONResponse({"scores": scores})

    async def not_found(request, exc):
        return JSONResponse({"error": f"no such path {request.url.path}; use GET /health or POST /score"},
                            status_code=exc.status_code)

    app = Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/score", score, methods=["POST"])],
                    exception_handlers={404: not_found, 405: not_found})
    app.state.stats = stats
    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: a free one); uvicorn listens on it with BACKLOG."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)  # listening from here on: a client that comes before uvicorn is up waits in the queue
    return sock


def uvicorn_server(app, max_concurrency: int, keep_alive_s: float = 30):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, backlog=BACKLOG, limit_concurrency=max_concurrency,
                                         timeout_keep_alive=keep_alive_s, log_level="warning", access_log=False))


def serve_in_thread(server, sock: socket.socket, what: str, deadline_s: float = 30) -> threading.Thread:
    """Run a uvicorn server on `sock` in a daemon thread of this process; returns once it serves, or raises
    naming `what` when it died or did not start within `deadline_s`."""
    import time

    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=what)
    thread.start()
    deadline = time.monotonic() + deadline_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)
    return thread


class RewardServer:
    """The server in a thread of this process (tests, notebooks):

        with RewardServer(Scorer(RuleRewards(["synthetic"])), token) as server:
            RemoteReward(server.url, token).score(...)      # server.stats counts scored requests
    """

    def __init__(self, scorer: Scorer, token: str, host: str = "127.0.0.1", port: int = 0, *,
                 max_body: int = MAX_BODY, max_items: int = MAX_ITEMS, max_concurrency: int = 1024):
        self.stats: dict = {"requests": 0, "items": 0}
        self.app = make_app(scorer, token, max_body, max_items, self.stats)
        self.sock = bind(host, port)
        h, p = self.sock.getsockname()[:2]
        self.url = f"http://{h}:{p}"
        self._server = uvicorn_server(self.app, max_concurrency)
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RewardServer:
        self._thread = serve_in_thread(self._server, self.sock, f"reward server on {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sock.close()


def _split(values: list[str] | None) -> list[str]:
    """Repeatable options that also take comma lists: --rules a,b --rules c -> [a, b, c]."""
    return [v.strip() for group in values or [] for v in group.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf serve-reward", description=__doc__.splitlines()[0])
    p.add_argument("--rules", action="append",
                   help="reward rules: registry names or path/to/file.py:function (repeatable or comma list)")
    p.add_argument("--weights", action="append", help="one weight per rule (repeatable or comma list)")
    p.add_argument("--reward-model", default="", help="a reward model export (rlhf train rm's run_dir/hf)")
    p.add_argument("--model-weight", type=float, default=1.0, help="weight of the reward model's score")
    p.add_argument("--template", choices=["chat", "plain"], default="chat",
                   help="how the reward model renders a conversation (data.template of its training)")
    p.add_argument("--quant", choices=["none", "4bit", "8bit"], default="none", help="load the reward model quantised")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: pick a free port")
    p.add_argument("--token-env", default="RLHF_REWARD_TOKEN", help="env var holding the bearer token")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY / 2**20, help="largest request body")
    p.add_argument("--max-items", type=int, default=MAX_ITEMS, help="most items in one request")
    p.add_argument("--max-concurrency", type=int, default=1024, help="open connections before 503 replies")
    return p


def main(argv: list[str] | None = None) -> int:
    from rlhf_system.errors import UserError

    args = build_parser().parse_args(argv)
    token = os.environ.get(args.token_env, "")
    if not token:  # an open scoring endpoint is never what one wants; the token itself is never printed
        raise UserError(f"set the bearer token in ${args.token_env} before starting the reward server")
    specs = _split(args.rules)
    try:
        weights = [float(w) for w in _split(args.weights)] if args.weights else None
    except ValueError as e:
        raise UserError(f"--weights must be numbers: {e}") from None
    rules = RuleRewards(specs, weights) if specs else None
    model = None
    if args.reward_model:
        from rlhf_system.models.reward_score import load_reward_scorer

        model = load_reward_scorer(args.reward_model, args.quant, args.template)
    app = make_app(Scorer(rules, model, args.model_weight), token, int(args.max_body_mb * 2**20), args.max_items)
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    print(json.dumps({"url": f"http://{host}:{port}"}), flush=True)  # callers read this line
    uvicorn_server(app, args.max_concurrency).run(sockets=[sock])  # until SIGINT / SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
