"""Rollouts beside training, with bounded staleness (train.max_staleness = k).

    pipe = RolloutPipeline(produce, k, mode, first=step, version=step)
    with pipe:
        batch = pipe.take(step)          # the step's rollout batch, sampled by policy version batch.version
        ... train on it, sync the engines ...
        pipe.synced(step + 1)            # the engines now hold version step + 1

A producer thread samples and scores batches (`produce(i, version)`: trainers/ppo_samples.py, or
trainers/partial.py for partial rollouts, whose groups in flight are `carry`) while the main
thread trains. Version v is the weights after v updates; the engines hold the version last synced. The
batch for step i is sampled by some version v <= i and trained at version i: its staleness is i - v.

- mode "wait": the producer starts batch i only once the engines hold version >= i - k, so no batch is
  ever more than k versions old. k = 0 is the synchronous step: batch i is sampled after update i-1
  reached the engines, exactly as before this file (same prompts, seeds and weights).
- mode "drop": the producer never waits for weights, only for room (at most k + 1 batches ahead); the
  trainer drops a batch older than k versions (counted in async/dropped) and takes the next one.

The engines serve one caller at a time: the producer holds `engines` while it generates and scores,
and the trainer takes it to sync weights or evaluate, so a weight update reaches the engines between
two generations, when an update finishes.

Checkpoints keep the batches in flight: `snapshot()` waits for a generation in progress to finish,
then returns the batches made and not yet trained with their versions, the next batch number, the
prompt position after them and the carried state (partial rollouts' groups in flight); the checkpoint saves them (pipeline.pt), and a resumed run `restore`s them
and trains on them as the uninterrupted run would have. So a resumed asynchronous run follows the
uninterrupted one exactly (tests/integration/test_resume.py), as a synchronous one does.

Overlap: every generation's wall-clock interval is kept; `overlap(a, b)` gives how much generation ran
inside [a, b] (the train phase), reported as time/generate_overlap.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

POLL_S = 0.2  # how often waits check that the other side is still alive


@dataclass
class Batch:
    index: int          # the producer's batch number (the step it was made for, in mode "wait")
    version: int        # the policy version that sampled it
    scored: object      # ppo_samples.Scored
    timer: dict         # time/generate, time/reward
    waited: float = 0.0  # seconds the trainer waited for it in `take`


class PipelineError(RuntimeError):
    pass


class RolloutPipeline:
    def __init__(self, produce, k: int, mode: str, first: int, last: int, version: int, prompts_state,
                 deadline_s: float, carry=None):
        """produce(i, version) -> (scored, timer) for batches first .. last - 1, sampled by the engines holding
        `version`; prompts_state() -> the prompt position now; `carry` (state_dict / load_state_dict): what
        the producer keeps between batches, kept in a snapshot. `deadline_s` bounds every wait on the producer."""
        self.produce, self.k, self.mode, self.last, self.carry = produce, k, mode, last, carry
        self.prompts_state, self.deadline_s = prompts_state, deadline_s
        self.engines = threading.Lock()
        self._cv = threading.Condition()
        self._queue: deque[Batch] = deque()
        self._next, self._version = first, version
        self._stop, self._error = False, None
        self._intervals: list[tuple[float, float]] = []
        self._busy_since: float | None = None
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    # ------------------------------------------------------------------------------------- producer
    def _ready(self) -> bool:
        if self._stop or self._next >= self.last:
            return True
        if len(self._queue) > self.k:  # room: at most k + 1 batches made and not yet trained
            return False
        return self.mode == "drop" or self._version >= self._next - self.k

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._ready():
                        self._cv.wait(POLL_S)
                    if self._stop or self._next >= self.last:
                        return
                    i = self._next
                with self.engines:
                    version = self._version  # what the engines hold: syncs take this lock too
                    start = self._busy_since = time.perf_counter()
                    scored, timer = self.produce(i, version)
                    self._intervals.append((start, time.perf_counter()))
                    self._busy_since = None
                    with self._cv:  # queued before the engines are let go: a snapshot sees it
                        self._queue.append(Batch(i, version, scored, timer))
                        self._next += 1
                        self._cv.notify_all()
        except BaseException as e:  # handed to the trainer, which raises it
            with self._cv:
                self._error = e
                self._cv.notify_all()

    # -------------------------------------------------------------------------------------- trainer
    def __enter__(self) -> RolloutPipeline:
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        # The producer finishes a generation in progress (an engine call cannot be interrupted). After a
        # failure only briefly: the run then stops the engines, which ends that call. A daemon either way,
        # so nothing it waits on can keep the process alive past the run.
        self._thread.join(self.deadline_s if exc_type is None else 10.0)

    def take(self, step: int) -> Batch:
        """The batch to train at `step` (the current version): the oldest one made, less those too old."""
        t0 = time.monotonic()
        deadline = t0 + self.deadline_s
        with self._cv:
            while True:
                if self._error is not None:
                    raise self._error
                while self._queue and step - self._queue[0].version > self.k:  # mode drop only
                    self._queue.popleft()
                    self.dropped += 1
                    self._cv.notify_all()
                if self._queue:
                    batch = self._queue.popleft()
                    batch.waited = time.monotonic() - t0
                    self._cv.notify_all()
                    return batch
                if not self._thread.is_alive() and not self._queue:
                    raise PipelineError(f"the rollout producer stopped before making the batch of step {step}")
                if time.monotonic() > deadline:
                    raise PipelineError(f"no rollout batch for step {step} within placement.call_timeout_s="
                                        f"{self.deadline_s:g}")
                self._cv.wait(POLL_S)

    def synced(self, version: int) -> None:
        """The engines now hold `version` (call with `engines` held, right after the sync)."""
        with self._cv:
            self._version = version
            self._cv.notify_all()

    def sync_weights(self, version: int, sync) -> tuple[float, float]:
        """Run `sync()` (weights -> engines) to make `version` current: (its seconds, seconds waited first).

        In mode "wait" it first waits until the batch to be sampled by version - 1 (batch version - 1 + k)
        is made, so every batch's version is fixed by the schedule, not by which thread is quicker: a
        resumed run and an uninterrupted one sample with the same weights. Then it takes the engines
        (waiting for a generation in progress)."""
        t0 = time.monotonic()
        due = version - 1 + self.k
        if self.mode == "wait":
            with self._cv:
                while self._next <= due < self.last and self._error is None and self._thread.is_alive():
                    if time.monotonic() - t0 > self.deadline_s:
                        raise PipelineError(f"batch {due} was not made within {self.deadline_s:g} s")
                    self._cv.wait(POLL_S)
        with self.engines:
            waited = time.monotonic() - t0
            seconds = sync()
            self.synced(version)
        return seconds, waited

    def snapshot(self) -> dict:
        """What a checkpoint keeps: {"batches": made and not yet trained, "next": the next batch number,
        "prompts": the prompt position after them, "carry": the carried state or None}. Waits for a
        generation in progress to finish."""
        with self.engines, self._cv:
            return {"batches": list(self._queue), "next": self._next, "prompts": self.prompts_state(),
                    "carry": self.carry.state_dict() if self.carry is not None else None}

    def restore(self, snapshot: dict) -> None:
        """Before `__enter__`: take back a checkpoint's batches in flight (its prompt position is restored
        by the caller)."""
        self._queue.extend(snapshot["batches"])
        self._next = snapshot["next"]
        if snapshot.get("carry") is not None:
            self.carry.load_state_dict(snapshot["carry"])

    def overlap(self, start: float, end: float) -> float:
        """Seconds of generation inside [start, end], the one in progress included."""
        spans = list(self._intervals[-8:])
        if self._busy_since is not None:
            spans.append((self._busy_since, time.perf_counter()))
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans)
