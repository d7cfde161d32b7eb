"""RolloutGroup's dispatch (chunks to the least-loaded engine, prompt-major reassembly, naming a failed
engine) with stand-in engines: the engines are Ray actors, only vLLM is left out."""

import time

import pytest

from rlhf_system.config import RunConfig
from rlhf_system.data.samples import Generation
from rlhf_system.placement.group import GroupCallError
from rlhf_system.workers.rollout import RolloutGroup


class EchoEngine:
    """Answers each prompt with n samples [prompt[0], engine, k]. An engine listed in BROKEN answers its
    first call and raises from its second on, like an engine that dies mid-step.
    Each call takes 0.5 s, so no chunk finishes while generate hands them out. The second generate fails;
    with two engines, its chunks go to engines in load order, so a chunk's place need not be its engine."""

    BROKEN: tuple[int, ...] = ()

    def __init__(self, model_path: str, cfg: RunConfig, plan):
        self.index, self.calls = plan.index, 0

    def ready(self) -> int:
        return self.index

    def generate(self, prompts, n, temperature, seed=None, max_new_tokens=None, seeds=None):
        time.sleep(0.5)
        self.calls += 1
        if self.index in self.BROKEN and self.calls > 1:
            raise RuntimeError(f"engine {self.index} is broken")
        return [Generation([p[0], self.index, k], [0.0] * 3, "stop") for p in prompts for k in range(n)]

    def shutdown(self) -> None:
        pass


def _group(engines: int, broken: tuple[int, ...] = ()) -> RolloutGroup:
    cfg = RunConfig(mode="ppo")
    cfg.rollout.num_engines, cfg.placement.call_timeout_s = engines, 60
    return RolloutGroup(cfg, "unused", engine_cls=type("Engine", (EchoEngine,), {"BROKEN": broken}))


def test_samples_come_back_prompt_major_from_both_engines(ray_cluster):
    group = _group(2)
    try:
        out = group.generate([[p] for p in range(10)], n=3)
    finally:
        group.shutdown()
    assert [(s.response_ids[0], s.response_ids[2]) for s in out] == [(p, k) for p in range(10) for k in range(3)]
    assert {s.response_ids[1] for s in out} == {0, 1}  # both engines got work
    assert group.load == [0, 0]  # nothing left counted as in flight


@pytest.mark.parametrize("engines,broken", [(1, 0), (2, 1), (2, 0)])
def test_a_failed_engine_is_named_by_its_index_not_its_chunk(ray_cluster, engines, broken):
    group = _group(engines, (broken,))
    try:
        group.generate([[p] for p in range(8)], n=2)  # every engine's first call answers
        with pytest.raises(GroupCallError) as err:
            group.generate([[p] for p in range(8)], n=2)
    finally:
        group.shutdown()
    assert f"engine {broken} failed" in str(err.value) and f"engine {broken} is broken" in str(err.value)


# ------------------------------------------------------------------ weight sync: who failed, how fast
class _StuckSender:
    """An actor rank whose send waits for a receiver that never comes (until its own deadline)."""

    def ws_send(self, plan):
        time.sleep(60)


class _RaisingEngine:
    def ws_receive(self, plan):
        time.sleep(0.2)
        raise RuntimeError("vLLM reload failed on this engine")


def test_an_engine_that_raises_mid_sync_is_named_at_once_not_after_the_senders_deadline(ray_cluster):
    """The sender of a broadcast is stuck until its own deadline when a receiver stops; the controller
    reports the engine's error as soon as it arrives, naming it."""
    import ray

    from rlhf_system.distributed.weight_sync import WeightSync, WeightSyncError

    actor = type("G", (), {"workers": [ray.remote(_StuckSender).remote()]})()
    engines = [ray.remote(_RaisingEngine).remote()]
    rollout = type("R", (), {"engines": engines})()
    sync = WeightSync(actor, rollout, timeout_s=120, backend="fake_nccl")
    sync.plan = []
    t = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"weight sync 'send': engine 0 failed \(also: actor rank 0 \(still "
                                              r"running\)\).*vLLM reload failed on this engine"):
        sync.sync()
    assert time.monotonic() - t < 20
    for a in actor.workers + engines:
        ray.kill(a)
