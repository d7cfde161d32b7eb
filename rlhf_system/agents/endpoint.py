"""An OpenAI-compatible endpoint in front of the rollout engines, for agent programs (runner.py).

    POST /v1/chat/completions   {"messages": [...], "max_tokens"?, "tools"?}  -> a chat.completion
    POST /v1/completions        {"prompt": "..."}                            -> a text_completion
    GET  /v1/models, GET /health

Each episode has its own bearer token (its `api_key`), which names its Session (session.py): the
endpoint keeps that episode's token ids, so a client only changes its base_url. Sampling is the run's
(rollout.temperature, top_p; seeded per episode and call): a request's temperature, top_p, seed or
logprobs settings are ignored, since the samples must come from the policy being trained. Responses carry
the token ids as well as the text (`choices[0].token_ids`, `prompt_token_ids`), as vLLM's server can.

Requests from concurrent episodes are batched into one engine call: a batch waits for more while they
keep arriving (rollout.agent_batch_wait_ms after the last, ten times that at most), and goes at once when
every running episode is waiting. Waiting
requests sit on the server's event loop, not in threads (a thread pool would cap how many can wait for
one batch); the engine calls run on one thread (the controller's rollout group is not shared between
threads) under the group's own deadlines; an engine failure fails the waiting requests (500) and is re-raised to the run.

Errors are OpenAI-shaped JSON, {"error": {"message", "type"}}: 401 unknown token, 400 a malformed or
history-rewriting request, 409 an episode's call or token budget spent, 410 an episode already over.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from rlhf_system.agents.session import AgentCallError, Session
from rlhf_system.data.samples import Generation

log = logging.getLogger(__name__)
CALL_SEED = 7_368_787  # seed offset of each later call of an episode (as trainers/episodes.TURN_SEED)


@dataclass
class _Request:
    ids: list[int]
    max_new: int
    seed: int | None
    done: object  # done(sample, error): called on the batcher's thread


class Batcher:
    """Serves generate requests from many threads with batched engine calls made on one thread."""

    def __init__(self, rollout, wait_s: float, temperature: float = 1.0):
        self.rollout, self.wait_s = rollout, wait_s
        self.temperature = temperature    # the run's (evaluation sets its own for its episodes)
        self.queue: queue.Queue[_Request] = queue.Queue()
        self.running = 0                  # episodes in progress (set by the runner)
        self.fatal: BaseException | None = None  # an engine failure: every later request fails with it
        self.engine_calls = self.requests = 0    # how well requests batch (agent/batch_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="agent-batcher", daemon=True)
        self._thread.start()

    def submit(self, ids: list[int], max_new: int, seed: int | None, done) -> None:
        """Queue a request; `done(sample, error)` is called from the batcher's thread when it is served."""
        self.queue.put(_Request(ids, max_new, seed, done))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            # Gather while requests keep coming: each arrival extends the wait by wait_s, up to 10 x wait_s in
            # all, and the batch goes at once when every running episode is in it. Agents' requests trickle in
            # (HTTP and JSON in the controller's threads, beside training on the same cores): a fixed window
            # cut one round of 128 episodes into 11-18 engine calls, measured.
            batch = [first]
            cap = time.monotonic() + 10 * self.wait_s
            while len(batch) < max(1, self.running):
                wait = min(self.wait_s, cap - time.monotonic())
                if wait <= 0:
                    break
                try:
                    batch.append(self.queue.get(timeout=wait))
                except queue.Empty:
                    break
            self._serve(batch)

    def _serve(self, batch: list[_Request]) -> None:
        by_limit: dict[int, list[_Request]] = {}
        for r in batch:  # one engine call per new-token limit (the limit is per call)
            by_limit.setdefault(r.max_new, []).append(r)
        for limit, reqs in by_limit.items():
            try:
                if self.fatal is not None:
                    raise self.fatal
                self.engine_calls, self.requests = self.engine_calls + 1, self.requests + len(reqs)
                out = self.rollout.generate([r.ids for r in reqs], n=1, temperature=self.temperature,
                                            max_new_tokens=limit, seeds=[r.seed for r in reqs]
                                            if all(r.seed is not None for r in reqs) else None)
                for r, sample in zip(reqs, out):
                    r.done(sample, None)
            except BaseException as e:  # the engines' own error, reported to each caller and to the run
                self.fatal = self.fatal or e
                for r in reqs:
                    r.done(None, e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class _Live:
    session: Session
    seed: int | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one call at a time per episode
    over: bool = False


class Endpoint:
    """The server in a thread of this process. `open(session, seed)` returns an episode's api_key."""

    def __init__(self, batcher: Batcher, host: str, call_timeout_s: float, model_name: str):
        from rlhf_system.rewards.server import bind, serve_in_thread, uvicorn_server

        self.batcher, self.call_timeout_s, self.model_name = batcher, call_timeout_s, model_name
        self.sessions: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self.app = self._make_app()
        self.sock = bind(host, 0)
        h, p = self.sock.getsockname()[:2]
        self.base_url = f"http://{h}:{p}/v1"
        # Idle connections stay open for the whole run: a client's pooled connection that the server closed
        # as it was reused came back as a connection error (seen once in a 10-step run, 30 s keep-alive).
        self._server = uvicorn_server(self.app, max_concurrency=4096, keep_alive_s=24 * 3600)
        self._thread = serve_in_thread(self._server, self.sock, f"agent endpoint on {self.base_url}")

    def open(self, session: Session, seed: int | None) -> str:
        import secrets

        key = "rlhf-" + secrets.token_urlsafe(24)
        with self._lock:
            self.sessions[key] = _Live(session, seed)
        return key

    def close_session(self, key: str) -> None:
        """The episode is over: later calls with its key get 410, and its session is released."""
        with self._lock:
            live = self.sessions.get(key)
            if live is not None:
                live.over = True

    def forget(self, key: str) -> None:
        with self._lock:
            self.sessions.pop(key, None)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.sock.close()

    # ------------------------------------------------------------------------------------------ app
    def _live(self, request) -> _Live:
        given = request.headers.get("authorization", "")
        key = given.removeprefix("Bearer ").strip()
        with self._lock:
            # constant-time comparison against each key would be O(sessions); the keys are 192-bit random,
            # so a dictionary lookup leaks nothing useful
            live = self.sessions.get(key)
        if live is None or not hmac.compare_digest(given, f"Bearer {key}"):
            raise AgentCallError(401, "unknown or missing API key: each episode's api_key is its bearer token")
        if live.over:
            raise AgentCallError(410, "this episode is over (its deadline passed or its agent returned)")
        return live

    async def _call(self, live: _Live, begin) -> tuple[Generation, list[int], str]:
        """`begin(session) -> (ids, limit)`: a chat or a text call's start (session.py). The request waits on
        the event loop, not in a thread: hundreds of episodes can wait for one batched engine call."""
        loop = asyncio.get_running_loop()
        async with live.lock:
            s = live.session
            before = s.checkpoint()
            try:
                return await self._generate(loop, live, s, begin)
            except BaseException:
                s.restore(before)  # a failed call leaves the episode as it was: the client may retry it
                raise

    async def _generate(self, loop, live: _Live, s: Session, begin) -> tuple[Generation, list[int], str]:
        ids, limit = begin(s)
        seed = None if live.seed is None else live.seed + CALL_SEED * s.calls
        got: asyncio.Future = loop.create_future()

        def done(gen, error) -> None:
            loop.call_soon_threadsafe(lambda: got.done() or (got.set_exception(error) if error is not None
                                                             else got.set_result(gen)))

        self.batcher.submit(ids, limit, seed, done)
        try:
            gen = await asyncio.wait_for(got, self.call_timeout_s)
        except TimeoutError:
            raise AgentCallError(504, f"no engine answer within {self.call_timeout_s:g} s") from None
        return gen, ids, s.end_call(gen)

    def _make_app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        def error(status: int, message: str) -> JSONResponse:
            kind = {401: "authentication_error", 404: "not_found_error", 409: "budget_exceeded",
                    410: "episode_over", 500: "engine_error", 504: "timeout"}.get(status, "invalid_request_error")
            return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

        async def body_of(request) -> dict:
            try:
                body = await request.json()
            except Exception:
                raise AgentCallError(400, "the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise AgentCallError(400, "the body must be a JSON object")
            if body.get("stream"):
                raise AgentCallError(400, "stream=true is not supported: ask for the whole completion")
            if body.get("n", 1) != 1:
                raise AgentCallError(400, "n must be 1: an episode's calls are one trajectory")
            return body

        def usage(prompt: list[int], gen: Generation) -> dict:
            k = len(gen.response_ids)
            return {"prompt_tokens": len(prompt), "completion_tokens": k, "total_tokens": len(prompt) + k}

        async def chat(request):
            try:
                live = self._live(request)
                body = await body_of(request)
                max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
                gen, ids, text = await self._call(
                    live, lambda s: s.begin_call(body.get("messages"), body.get("tools"), max_tokens))
            except AgentCallError as e:
                return error(e.status, str(e))
            except Exception as e:  # the engines failed: the run will report it too
                return error(500, f"generation failed: {type(e).__name__}: {e}")
            return JSONResponse({
                "id": f"chatcmpl-{id(gen):x}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model") or self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": gen.finish_reason, "token_ids": gen.response_ids}],
                "prompt_token_ids": ids, "usage": usage(ids, gen)})

        async def completions(request):
            try:
                live = self._live(request)
                body = await body_of(request)
                gen, ids, text = await self._call(live, lambda s: s.begin_text(body.get("prompt"), body.get("max_tokens")))
            except AgentCallError as e:
                return error(e.status, str(e))
            except Exception as e:
                return error(500, f"generation failed: {type(e).__name__}: {e}")
            return JSONResponse({
                "id": f"cmpl-{id(gen):x}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model") or self.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": gen.finish_reason,
                             "token_ids": gen.response_ids}],
                "prompt_token_ids": ids, "usage": usage(ids, gen)})

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                             "owned_by": "rlhf_system"}]})

        async def health(request):
            return JSONResponse({"ok": True, "episodes": sum(not s.over for s in list(self.sessions.values()))})

        async def not_found(request, exc):
            return error(404, f"no such path {request.method} {request.url.path}; this endpoint serves POST "
                              "/v1/chat/completions and /v1/completions")

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                                 Route("/v1/completions", completions, methods=["POST"]),
                                 Route("/v1/models", models, methods=["GET"]), Route("/health", health)],
                         exception_handlers={404: not_found, 405: not_found})
