"""Waiting on Ray calls under one deadline, and naming who failed: shared by the worker groups
(placement/group.py, workers/rollout.py) and the weight sync (distributed/weight_sync.py).

Every wait has a deadline (a hang is a bug), and when several calls fail, the one whose process
died is named first: its peers in a collective fail *because* of it.
"""

from __future__ import annotations

from typing import Any


def collect(refs: list, timeout: float, stop_on_error: bool = False) -> tuple[dict[int, Any], dict[int, Exception], list[int]]:
    """Results and Ray errors by position in `refs`, and the positions still running, under ONE deadline.

    Returns early once a worker's process has died: its peers in a collective (an all-reduce, a
    weight-sync broadcast) would otherwise sit out the whole deadline waiting for it. With
    `stop_on_error`, at the first failure of any kind (a weight sync's peers cannot finish without it)."""
    import time

    import ray

    deadline = time.monotonic() + timeout
    where = {ref: i for i, ref in enumerate(refs)}
    pending, results, errors = list(refs), {}, {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        for ref in ready:
            try:
                results[where[ref]] = ray.get(ref)
            except ray.exceptions.RayError as e:
                errors[where[ref]] = e
        if (errors and stop_on_error) or any(isinstance(e, ray.exceptions.RayActorError) for e in errors.values()):
            break
    return results, errors, sorted(where[r] for r in pending)


def blame(errors: dict[int, Exception], running: list[int], names: list[str]) -> tuple[int, str]:
    """(position to name first, " (also: ...)" listing the rest). First is a worker whose process died:
    its peers then fail *because* of it, so the first failure in list order may be a healthy process."""
    import ray

    died = [i for i, e in sorted(errors.items()) if isinstance(e, ray.exceptions.RayActorError)]
    first = (died or sorted(errors))[0]
    others = [names[i] for i in sorted(errors) if names[i] != names[first]]
    others += [f"{names[i]} (still running)" for i in running]
    others = list(dict.fromkeys(others))  # generate's chunks share an engine's name
    return first, f" (also: {', '.join(others)})" if others else ""


def wait_all(refs: list, names: list[str], timeout: float, what: str, error: type[Exception] = RuntimeError,
             stop_on_error: bool = False) -> list:
    """ray.get every ref under ONE deadline; a failed or late one is named (`names[i]`) in the error,
    the root cause first."""
    results, errors, running = collect(refs, timeout, stop_on_error)
    if errors:
        first, also = blame(errors, running, names)
        e = errors[first]
        cause = getattr(e, "cause", None)  # a task's own exception: its words, not Ray's traceback
        why = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
        raise error(f"{what}: {names[first]} failed{also}: {why}") from None
    if running:
        late = ", ".join(dict.fromkeys(names[i] for i in running))
        raise error(f"{what}: {late} did not answer within {timeout:g}s")
    return [results[i] for i in range(len(refs))]
