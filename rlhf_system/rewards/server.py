"""`rlhf serve-reward`: an HTTP server that scores (prompt, response, meta) batches with reward rules.

    GET  /health -> {"ok": true}                                  (no auth, for liveness probes)
    POST /score  {"items": [{"prompt", "response", "meta"}, ...]} -> {"scores": [...]}
                 needs "Authorization: Bearer <token>"; the whole list is scored in one call.

Errors are JSON {"error": "..."}: 401 bad/missing token, 400 malformed body or a rule rejecting its
input, 413 body too large, 404 unknown path, 500 a rule crashing. Standard library only.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf_system.rewards.registry import RewardError, RuleRewards

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024 * 1024  # bytes; a batch of thousands of long responses is well under this


class _BadRequest(Exception):
    """A client error with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse_items(body: bytes) -> tuple[list[str], list[str], list[dict]]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _BadRequest(400, f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise _BadRequest(400, 'body must be a JSON object with an "items" list')
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


def _handler(rules: RuleRewards, token: str, stats: dict, lock: threading.Lock) -> type:
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "rlhf-reward/1"

        def log_message(self, format, *args):
            log.debug("%s %s", self.address_string(), format % args)  # not one stderr line per request

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _read_body(self) -> bytes:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise _BadRequest(400, "Content-Length header is missing or not a number") from None
            if length < 0 or length > MAX_BODY:
                raise _BadRequest(413, f"body of {length} bytes is over the {MAX_BODY}-byte limit")
            return self.rfile.read(length)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"ok": True})
            else:
                self._send(404, {"error": f"no such path {self.path}; use GET /health or POST /score"})

        def do_POST(self):
            try:
                if self.path != "/score":
                    raise _BadRequest(404, f"no such path {self.path}; use POST /score")
                # Read the body even when refusing, so the client sees our reply, not a reset socket.
                body = self._read_body()
                given = self.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    raise _BadRequest(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
                prompts, responses, metas = _parse_items(body)
                try:
                    scores = rules.score(prompts, responses, metas)
                except RewardError as e:  # the rule rejected this input (e.g. a meta key missing)
                    raise _BadRequest(400, str(e)) from None
            except _BadRequest as e:
                self._send(e.status, {"error": str(e)})
                return
            except Exception as e:  # a crashing rule: report it, keep serving
                log.exception("reward rules failed")
                self._send(500, {"error": f"reward rules failed: {e!r}"})
                return
            with lock:
                stats["requests"] += 1
                stats["items"] += len(scores)
            self._send(200, {"scores": scores})

    return Handler


def make_server(specs: Sequence[str], weights: Sequence[float] | None, host: str, port: int,
                token: str) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; `port` 0 picks a free one (see server.server_address).
    `server.stats` counts scored requests and items."""
    if not token:
        raise ValueError("reward server needs a non-empty bearer token")
    rules = RuleRewards(specs, weights)
    stats = {"requests": 0, "items": 0}
    server = ThreadingHTTPServer((host, port), _handler(rules, token, stats, threading.Lock()))
    server.stats = stats
    return server


def _split(values: list[str] | None) -> list[str]:
    """Repeatable options that also take comma lists: --rules a,b --rules c -> [a, b, c]."""
    return [v.strip() for group in values or [] for v in group.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf serve-reward", description=__doc__.splitlines()[0])
    p.add_argument("--rules", action="append", required=True,
                   help="reward rules: registry names or path/to/file.py:function (repeatable or comma list)")
    p.add_argument("--weights", action="append", help="one weight per rule (repeatable or comma list)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: pick a free port")
    p.add_argument("--token-env", default="RLHF_REWARD_TOKEN", help="env var holding the bearer token")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = os.environ.get(args.token_env, "")
    if not token:  # an open scoring endpoint is never what one wants; the token itself is never printed
        print(f"error: set the bearer token in ${args.token_env} before starting the reward server",
              file=sys.stderr)
        return 2
    specs = _split(args.rules)
    try:
        weights = [float(w) for w in _split(args.weights)] if args.weights else None
    except ValueError as e:
        print(f"error: --weights must be numbers: {e}", file=sys.stderr)
        return 2
    try:
        server = make_server(specs, weights, args.host, args.port, token)
    except (RewardError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(json.dumps({"url": f"http://{host}:{port}"}), flush=True)  # callers read this line
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
