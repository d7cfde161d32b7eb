"""The rollout engines' placement plan: what each engine asks Ray and vLLM for, per device and
tensor-parallel size, and the one-line errors when a cluster cannot hold them."""

import pytest

from rlhf_system.config import ConfigError, RunConfig
from rlhf_system.placement.engines import actor_options, check_cluster, engine_plans


def cfg(gpus_per_node=0, engines=1, tp=1):
    c = RunConfig(mode="ppo")
    c.placement.gpus_per_node, c.placement.cpus_per_worker = gpus_per_node, 2
    c.rollout.num_engines, c.rollout.tensor_parallel_size = engines, tp
    return c


@pytest.mark.parametrize("tp, executor", [(1, "uni"), (2, "mp")])
def test_cpu_engines_reserve_nothing(tp, executor):
    plans = engine_plans(cfg(engines=2, tp=tp))
    assert [p.index for p in plans] == [0, 1]
    for p in plans:
        assert p.bundles == [] and p.actor == {"num_cpus": 0, "num_gpus": 0} and p.executor == executor
        # no placement group at all; the GPUs of a CUDA host hidden from the engine's process
        # and with t = 1, vLLM inside the actor's process (no engine-core or worker process to start)
        inline = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if tp == 1 else {}
        assert actor_options(p, None) == {"num_cpus": 0, "num_gpus": 0, "runtime_env": {"env_vars": {
            "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", **inline}}}


def test_cpu_bind_vllm_keeps_vllms_own_processes():
    """Only vLLM's multiprocessing executor applies its own thread binding: rollout.cpu_bind=vllm is not inline."""
    c = cfg()
    c.rollout.cpu_bind = "vllm"
    (plan,) = engine_plans(c)
    assert plan.executor == "mp" and "VLLM_ENABLE_V1_MULTIPROCESSING" not in plan.env


def test_gpu_tp1_engine_holds_its_bundle_gpu_itself():
    plans = engine_plans(cfg(gpus_per_node=8, engines=3))
    assert len(plans) == 3
    for p in plans:
        assert p.bundles == [{"GPU": 1.0, "CPU": 2.0}] and p.actor == {"num_cpus": 2.0, "num_gpus": 1.0}
        assert p.executor is None and p.env == {}


def test_gpu_tp_engine_places_vllm_workers_in_its_own_bundles():
    plans = engine_plans(cfg(gpus_per_node=8, engines=2, tp=4))
    for p in plans:
        assert p.bundles == [{"GPU": 1.0, "CPU": 2.0}] * 4 and p.strategy == "STRICT_PACK"  # one node per engine
        assert p.actor == {"num_cpus": 0, "num_gpus": 0}  # vLLM's Ray workers take the GPUs
        assert p.executor == "ray"
        assert p.env == {"VLLM_RAY_BUNDLE_INDICES": "0,1,2,3", "VLLM_RAY_PER_WORKER_GPUS": "1"}
    opts = actor_options(plans[1], pg := object())
    strategy = opts["scheduling_strategy"]
    assert strategy.placement_group is pg and strategy.placement_group_bundle_index == 0
    assert strategy.placement_group_capture_child_tasks  # vLLM's workers join the engine's group


def test_cluster_too_small_names_the_settings():
    plans = engine_plans(cfg(gpus_per_node=8, engines=2, tp=4))
    check_cluster(plans, [{"GPU": 8.0}])
    check_cluster(plans, [{"GPU": 4.0}, {"GPU": 4.0}])
    with pytest.raises(ConfigError, match=r"need 8 GPUs \(rollout.num_engines=2 x rollout.tensor_parallel_size=4\)"
                                          r" but the Ray cluster has 6"):
        check_cluster(plans, [{"GPU": 4.0}, {"GPU": 2.0}])
    with pytest.raises(ConfigError, match="needs 4 GPUs on one node, and the largest node has 2"):
        check_cluster(plans, [{"GPU": 2.0}] * 4)
    check_cluster(engine_plans(cfg(engines=4, tp=2)), [{"CPU": 2.0}])  # CPU engines reserve nothing
