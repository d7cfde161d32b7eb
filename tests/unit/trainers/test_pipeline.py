"""The rollout pipeline (trainers/pipeline.py) with a stand-in producer: who waits for whom, the staleness
bound, dropping, the checkpointed prompt position, and errors. The PPO runs with real engines are in
tests/integration/test_async.py."""

import threading
import time

import pytest

from rlhf_system.trainers.pipeline import PipelineError, RolloutPipeline


class Producer:
    """Records, per batch, the engines' version when it was made; draws one 'prompt batch' per call."""

    def __init__(self, seconds=0.0, fail_at=None):
        self.position, self.log, self.seconds, self.fail_at = 0, [], seconds, fail_at

    def __call__(self, i, version):
        if i == self.fail_at:
            raise RuntimeError("engine 0 died")
        self.position += 1
        time.sleep(self.seconds)
        self.log.append(i)
        return f"batch-{i}", {"time/generate": self.seconds}

    def state(self):
        return {"position": self.position}


def drive(pipe, steps, train_s=0.0, on_step=None, first=0):
    """The trainer's side: take, 'train', sync; returns (step, batch index, version) per step."""
    seen = []
    with pipe:
        for step in range(first, steps):
            batch = pipe.take(step)
            seen.append((step, batch.index, batch.version))
            time.sleep(train_s)
            if on_step:
                on_step(step, pipe)
            pipe.sync_weights(step + 1, lambda: 0.0)
    return seen


def test_k0_is_the_synchronous_step():
    prod = Producer()
    pipe = RolloutPipeline(prod, 0, "wait", first=0, last=5, version=0, prompts_state=prod.state, deadline_s=10)
    seen = drive(pipe, 5, train_s=0.01)
    assert seen == [(i, i, i) for i in range(5)]  # every batch sampled by the newest weights


def test_k1_samples_the_next_batch_during_training_within_the_bound():
    prod = Producer(seconds=0.05)
    pipe = RolloutPipeline(prod, 1, "wait", first=0, last=6, version=0, prompts_state=prod.state, deadline_s=10)
    overlaps = []
    seen = drive(pipe, 6, train_s=0.1, on_step=lambda s, p: overlaps.append(p.overlap(time.perf_counter() - 0.1,
                                                                                        time.perf_counter())))
    assert [s - v for s, _, v in seen] == [0, 1, 1, 1, 1, 1]  # one-step off-policy, never beyond k
    assert prod.log == list(range(6))  # nothing made past the last step
    assert sum(o > 0.01 for o in overlaps) >= 4  # generation ran inside the train phases


def test_k2_bound_holds_when_training_is_slow():
    prod = Producer()
    pipe = RolloutPipeline(prod, 2, "wait", first=3, last=10, version=3, prompts_state=prod.state, deadline_s=10)
    seen = drive(pipe, 10, train_s=0.02, first=3)
    # the schedule fixes every version: batch i is sampled by version i - 2 (or the first one)
    assert [(s, v) for s, _, v in seen] == [(3, 3), (4, 3), (5, 3), (6, 4), (7, 5), (8, 6), (9, 7)]


def test_drop_mode_drops_batches_older_than_k():
    prod = Producer()
    pipe = RolloutPipeline(prod, 0, "drop", first=0, last=50, version=0, prompts_state=prod.state, deadline_s=10)
    with pipe:
        first = pipe.take(0)
        time.sleep(0.05)  # the producer runs ahead (one batch), made with version 0
        pipe.sync_weights(1, lambda: 0.0)
        second = pipe.take(1)  # a version-0 batch is 1 old at step 1: dropped when k = 0
    assert first.version == 0 and second.version == 1 and pipe.dropped >= 1


def test_snapshot_and_restore_continue_as_the_uninterrupted_pipeline():
    straight = drive(RolloutPipeline(Producer(), 1, "wait", first=0, last=6, version=0, prompts_state=dict,
                                     deadline_s=10), 6)
    prod = Producer()
    pipe = RolloutPipeline(prod, 1, "wait", first=0, last=6, version=0, prompts_state=prod.state, deadline_s=10)
    snaps = []
    first = drive(pipe, 3, on_step=lambda s, p: snaps.append(p.snapshot()) if s == 2 else None)
    snap = snaps[0]  # after step 2 trained, before its sync: batch 3 was sampled ahead, by version 2
    assert [(b.index, b.version) for b in snap["batches"]] == [(3, 2)] and snap["next"] == 4
    assert snap["prompts"] == {"position": 4}  # after every batch drawn, the kept ones included
    resumed = RolloutPipeline(Producer(), 1, "wait", first=3, last=6, version=3, prompts_state=dict, deadline_s=10)
    resumed.restore(snap)
    assert first + drive(resumed, 6, first=3) == straight


def test_producer_error_reaches_the_trainer_and_nothing_hangs():
    prod = Producer(fail_at=2)
    pipe = RolloutPipeline(prod, 1, "wait", first=0, last=10, version=0, prompts_state=prod.state, deadline_s=10)
    with pytest.raises(RuntimeError, match="engine 0 died"):
        drive(pipe, 5)


def test_take_has_a_deadline():
    gate = threading.Event()
    pipe = RolloutPipeline(lambda i, version: (gate.wait(5), {}), 0, "wait", first=0, last=2, version=0,
                           prompts_state=dict, deadline_s=0.3)
    t = time.monotonic()
    with pytest.raises(PipelineError, match="no rollout batch for step 0 within"):
        with pipe:
            pipe.take(0)
    gate.set()
    assert time.monotonic() - t < 15


class Carry:
    """What a partial-rollout producer keeps between batches (trainers/partial.py's pool)."""

    def __init__(self):
        self.made = []

    def __call__(self, i, version):
        self.made.append((i, version))
        return f"batch-{i}", {}

    def state_dict(self):
        return {"made": list(self.made)}

    def load_state_dict(self, state):
        self.made = [tuple(x) for x in state["made"]]


def test_snapshot_keeps_the_carried_state_and_restore_puts_it_back():
    carry = Carry()
    pipe = RolloutPipeline(carry, 1, "wait", first=0, last=4, version=0, prompts_state=dict, deadline_s=10, carry=carry)
    snaps = []
    drive(pipe, 4, on_step=lambda step, p: snaps.append(p.snapshot()) if step == 1 else None)
    snap = snaps[0]
    assert snap["carry"]["made"] == [(i, v) for i, v in carry.made[:snap["next"]]]  # made under the engines' lock
    assert [(i, v) for i, v in carry.made] == [(0, 0), (1, 0), (2, 1), (3, 2)]  # batch i by version i - k
    again = Carry()
    resumed = RolloutPipeline(again, 1, "wait", first=2, last=4, version=2, prompts_state=dict, deadline_s=10, carry=again)
    resumed.restore(snap)
    assert again.made[:snap["next"]] == carry.made[:snap["next"]]
    assert RolloutPipeline(again, 0, "wait", first=0, last=1, version=0, prompts_state=dict,
                           deadline_s=1).snapshot()["carry"] is None
