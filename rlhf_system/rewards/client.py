"""RemoteReward: score (prompt, response, meta) batches on a `rlhf serve-reward` server over HTTP.

Transient failures (connection errors, timeouts, 5xx) are retried with exponential backoff; 4xx are
the caller's fault and fail at once. Standard library only.
"""

from __future__ import annotations

import http.client
import json
import math
import numbers
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from urllib.parse import urlsplit

from rlhf_system.errors import RunFailure, UserError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class RewardServerError(RunFailure):
    """The reward server could not be reached, refused the request or replied nonsense."""


class _Retryable(Exception):
    pass


class RemoteReward:
    def __init__(self, url: str, token: str, timeout_s: float = 60, retries: int = 3, batch_size: int = 256,
                 backoff_s: float = 0.5, *, token_env: str = "RLHF_REWARD_TOKEN"):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"rewards.remote_url={url!r} must look like http://host:port")
        if not token:
            raise UserError(f"rewards.remote_url={url}: empty bearer token. Fix: export {token_env}=<token> "
                            "(the server's token)")
        if batch_size < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"reward client: need batch_size >= 1, retries >= 0, timeout_s > 0, backoff_s >= 0; "
                             f"got {batch_size}, {retries}, {timeout_s}, {backoff_s}")
        base = url.rstrip("/")
        self.url = base if base.endswith("/score") else base + "/score"
        self.token, self.token_env = token, token_env
        self.timeout_s, self.retries, self.batch_size, self.backoff_s = timeout_s, retries, batch_size, backoff_s
        # Proxy variables must not send loopback traffic elsewhere; remote servers keep the user's proxy.
        handlers = [urllib.request.ProxyHandler({})] if parts.hostname in LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def score(self, prompts: Sequence[str], responses: Sequence[str], metas: Sequence[dict]) -> list[float]:
        n = len(prompts)
        if len(responses) != n or len(metas) != n:
            raise ValueError(f"reward inputs differ in length: {n} prompts, {len(responses)} responses, "
                             f"{len(metas)} metas")
        scores: list[float] = []
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            items = [{"prompt": prompts[i], "response": responses[i], "meta": metas[i]} for i in range(start, stop)]
            scores += self._post_with_retries(items, start)
        return scores

    def _post_with_retries(self, items: list[dict], offset: int) -> list[float]:
        body = json.dumps({"items": items}).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._check_reply(self._post(body), len(items), offset)
            except _Retryable as e:
                last = e
        raise RewardServerError(f"reward server {self.url} unreachable after {self.retries} retries: {last}")

    def _post(self, body: bytes) -> bytes:
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = _error_text(e)
            if e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {detail}") from None
            if e.code == 401:
                raise RewardServerError(f"reward server {self.url} rejected the bearer token (HTTP 401); "
                                        f"check ${self.token_env}") from None
            raise RewardServerError(f"reward server {self.url} refused the request (HTTP {e.code}): {detail}") from None
        except urllib.error.URLError as e:  # connection refused, DNS, timeout while connecting
            raise _Retryable(str(getattr(e.reason, "strerror", None) or e.reason)) from None
        except (ConnectionError, TimeoutError, http.client.HTTPException) as e:  # reset / cut off mid-reply
            raise _Retryable(f"{type(e).__name__}: {e}") from None

    def _check_reply(self, raw: bytes, n: int, offset: int) -> list[float]:
        try:
            scores = json.loads(raw)["scores"]
        except (ValueError, TypeError, KeyError):
            raise RewardServerError(f"reward server {self.url} replied without a JSON 'scores' list: "
                                    f"{raw[:200]!r}") from None
        if not isinstance(scores, list) or len(scores) != n:
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RewardServerError(f"reward server {self.url} returned {got} scores for {n} items")
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
                raise RewardServerError(f"reward server {self.url} returned score {s!r} for item {offset + i}")
        return [float(s) for s in scores]


def _error_text(e: urllib.error.HTTPError) -> str:
    """The server's JSON "error" message, else the start of the body, else the reason phrase."""
    try:
        raw = e.read()
    except OSError:
        return str(e.reason)
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, TypeError, KeyError):
        return raw[:200].decode(errors="replace") or str(e.reason)


def from_config(rewards_cfg) -> RemoteReward:
    """RemoteReward from a RewardsConfig; the token comes from the env var it names."""
    if not rewards_cfg.remote_url:
        raise UserError("rewards.remote_url is empty: no reward server configured")
    env = rewards_cfg.remote_token_env
    token = os.environ.get(env, "")
    if not token:
        raise UserError(f"rewards.remote_url is set but ${env} (rewards.remote_token_env) is unset or empty. "
                        f"Fix: export {env}=<the server's token>")
    return RemoteReward(rewards_cfg.remote_url, token, timeout_s=rewards_cfg.timeout_s,
                        retries=rewards_cfg.retries, token_env=env)
