"""The hybrid engine's decisions without starting anything: which colocations the config accepts, where
the engines go (the actor's bundles, a share of each GPU), which transport the sync uses, and that roles
sharing GPUs take turns while roles on their own GPUs work at once."""

import threading
import time

import pytest

from rlhf_system.config import ConfigError, RunConfig, validate
from rlhf_system.distributed.weight_sync import colocated_engines, sync_backend
from rlhf_system.placement.engines import actor_options, colocated_share, engine_plans


def _ppo(**placement) -> RunConfig:
    cfg = RunConfig(mode="ppo", data={"train": [{"path": "p.jsonl"}]}, rewards={"use_model": False, "rules": ["x"]})
    cfg.algorithm.estimator, cfg.algorithm.kl.coef = "grpo", 0.0
    cfg.train.rollout_batch_size, cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 16, 1
    cfg.rollout.n_samples_per_prompt = 4
    for k, v in placement.items():
        setattr(cfg.placement, k, v)
    return cfg


def test_gpu_hybrid_engine_takes_a_share_of_the_actor_bundles_and_maps_by_cuda_ipc():
    cfg = _ppo(gpus_per_node=8, actor=8, colocate=[["actor", "rollout"]])
    cfg.rollout.num_engines = 8
    validate(cfg)
    assert colocated_engines(cfg) and sync_backend(cfg) == "ipc" and colocated_share(cfg) == 2
    plans = engine_plans(cfg)
    assert [p.colocated_bundle for p in plans] == list(range(8))
    assert all(p.bundles == [] and p.actor == {"num_cpus": 0, "num_gpus": 0.5} for p in plans)
    opts = actor_options(plans[3], pg="PG")
    assert opts["scheduling_strategy"].placement_group_bundle_index == 3


def test_gpu_hybrid_engine_with_tensor_parallel_workers_on_consecutive_bundles():
    cfg = _ppo(gpus_per_node=8, actor=8, colocate=[["actor", "rollout"]])
    cfg.rollout.num_engines, cfg.rollout.tensor_parallel_size = 2, 4
    validate(cfg)
    p = engine_plans(cfg)[1]
    assert p.executor == "ray" and p.colocated_bundle == 4
    assert p.env == {"VLLM_RAY_BUNDLE_INDICES": "4,5,6,7", "VLLM_RAY_PER_WORKER_GPUS": "0.5"}


def test_cpu_hybrid_engine_maps_by_shared_memory():
    cfg = _ppo(colocate=[["actor", "rollout"]])
    validate(cfg)
    assert sync_backend(cfg) == "shm"
    (p,) = engine_plans(cfg)
    assert p.colocated_bundle == 0 and p.env["CUDA_VISIBLE_DEVICES"] == ""
    assert sync_backend(_ppo()) == "gloo" and sync_backend(_ppo(gpus_per_node=8, actor=7)) == "nccl"


@pytest.mark.parametrize("placement,over,message", [
    ({"colocate": [["reference", "rollout"]]}, {}, "rollout engines share devices only with the actor"),
    ({"colocate": [["actor", "rollout"]]}, {"max_staleness": 1}, "Fix: train.max_staleness=0"),
    ({"colocate": [["actor", "rollout"]], "actor": 2}, {}, "colocated roles need the same number of GPUs"),
    ({}, {"sync_backend": "nccl"}, "rollout.sync_backend=nccl needs GPUs"),
])
def test_what_cannot_colocate_is_one_line_before_workers(placement, over, message):
    cfg = _ppo(**placement)
    if "max_staleness" in over:
        cfg.train.max_staleness = over["max_staleness"]
    if "sync_backend" in over:
        cfg.rollout.sync_backend = over["sync_backend"]
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def _recorder():
    """start() -> wait() calls that log when each ran, to see which overlapped."""
    spans: dict[str, list[float]] = {}

    def call(key):
        def start():
            t0 = time.monotonic()
            done = threading.Event()
            threading.Timer(0.2, done.set).start()

            def wait():
                done.wait()
                spans[key] = [t0, time.monotonic()]
                return key
            return wait
        return start
    return spans, call


def _overlap(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_roles_sharing_gpus_take_turns_and_others_work_at_once():
    from rlhf_system.trainers.role_calls import in_turn_or_together

    cfg = _ppo(gpus_per_node=8, actor=4, reference=4, critic=4, colocate=[["actor", "reference"]])
    spans, call = _recorder()
    out = in_turn_or_together(cfg, {"old": call("old"), "ref": call("ref"), "values": call("values")})
    assert out == {"old": "old", "ref": "ref", "values": "values"}
    assert not _overlap(spans["old"], spans["ref"]), "actor and reference share GPUs: they must take turns"
    assert _overlap(spans["old"], spans["values"]), "the critic has GPUs of its own: it works meanwhile"
