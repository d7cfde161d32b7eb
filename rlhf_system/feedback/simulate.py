"""Simulated annotators: they vote through the same HTTP API as people, judging with the rule verifiers
(or any scoring function) and a chosen noise rate. CI and the demo run the whole loop with them.

    judge = rule_judge("synthetic")                                # score(task, response index) -> float
    stats = simulate("http://127.0.0.1:8000", access, tasks_by_id, judge, noise=0.1, seed=0)

Each annotator is a thread with its own HTTP connection: next -> judge -> vote, until no task is left.
A request that fails on the network (or gets a 5xx) is sent again until a deadline, a vote with the
same vote_id (the server stores it once), as the page does. With probability `noise` the judgement is replaced by a uniformly random one.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable

import httpx

from rlhf_system.feedback.tasks import Task

Judge = Callable[[Task, int], float]


def rule_judge(rule: str) -> Judge:
    """Scores response i of a task with a reward rule on the task's meta (the prompt row)."""
    from rlhf_system.rewards.registry import load_reward_fn

    fn = load_reward_fn(rule)
    return lambda task, i: float(fn(task.prompt_text(), task.responses[i].text, task.meta))


def decide(task: Task, shown: list[int], judge: Judge, noise: float, rng: random.Random) -> dict:
    """A vote's fields in display positions, as the page would send them."""
    scores = [judge(task, i) for i in shown]
    noisy = rng.random() < noise
    if task.kind == "ranking":
        order = list(range(len(shown)))
        if noisy:
            rng.shuffle(order)
        else:
            order.sort(key=lambda p: -scores[p])
        return {"ranking": order}
    a, b = scores
    if noisy:
        choice = rng.choice(["A", "B", "tie", "both_bad"])
    elif a == b:
        choice = "both_bad" if a <= 0 else "tie"
    else:
        choice = "A" if a > b else "B"
    out: dict = {"choice": choice}
    if choice in ("A", "B"):
        out["strength"] = "clearly" if abs(a - b) >= 0.5 else "slightly"
    return out


def with_retry(send, deadline_s: float) -> httpx.Response:
    """send() again on connection errors and 5xx answers, with backoff, until `deadline_s` has passed: a
    server restarting under load loses no vote (a POST resends the same vote_id, stored once)."""
    end = time.monotonic() + deadline_s
    delay = 0.05
    while True:
        try:
            r = send()
            if r.status_code < 500:
                return r
            failure = f"{r.status_code} {r.text[:200]}"
        except httpx.TransportError as e:
            failure = f"{type(e).__name__}: {e}"
        if time.monotonic() > end:
            raise RuntimeError(f"no answer from the feedback server within {deadline_s:g}s: {failure}")
        time.sleep(delay)
        delay = min(1.0, delay * 2)


def annotate(base: str, name: str, token: str, tasks: dict[str, Task], judge: Judge, noise: float, seed: int,
             max_votes: int | None, timeout_s: float) -> dict:
    """One simulated annotator's session; returns its counts and the vote_ids the server acknowledged."""
    rng = random.Random(f"{seed}/{name}")
    headers = {"Authorization": f"Bearer {token}"}
    acked: list[str] = []
    retried = 0
    with httpx.Client(base_url=base, timeout=timeout_s) as client:
        while max_votes is None or len(acked) < max_votes:
            r = with_retry(lambda: client.get(f"/api/{name}/next", headers=headers), timeout_s)
            r.raise_for_status()
            data = r.json()
            if data["task"] is None:
                break
            task = tasks[data["task"]["id"]]
            body = {"vote_id": uuid.uuid4().hex, "task_id": task.id, "shown": data["shown"],
                    "seconds": rng.uniform(2, 20), **decide(task, data["shown"], judge, noise, rng)}
            r = with_retry(lambda body=body: client.post(f"/api/{name}/vote", json=body, headers=headers), timeout_s)
            if r.status_code != 200:
                raise RuntimeError(f"annotator {name}: vote on {task.id} refused: {r.status_code} {r.text[:200]}")
            acked.append(body["vote_id"])
            retried += not r.json()["stored"]
    return {"votes": len(acked), "already_stored": retried, "acked": acked}


def simulate(base: str, annotators: dict[str, str], tasks: dict[str, Task], judge: Judge, noise: float = 0.0,
             seed: int = 0, max_votes: int | None = None, timeout_s: float = 60.0) -> dict[str, dict]:
    """Every annotator (name -> token) at once, until the server has nothing left for them."""
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(name: str, token: str) -> None:
        try:
            results[name] = annotate(base, name, token, tasks, judge, noise, seed, max_votes, timeout_s)
        except BaseException as e:  # reported below, after every thread has finished
            errors.append(e)

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in annotators.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3600)
    if errors:
        raise errors[0]
    return results
