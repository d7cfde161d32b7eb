"""Role placement on a real (local) Ray cluster: colocated roles share one placement group, each worker
taking its share of a bundle; separate roles get their own; an impossible request fails before any
worker starts."""

import pytest

from tests.integration.conftest import ppo_config


def test_colocated_roles_share_a_placement_group(ray_cluster, small_model, synthetic_dir, tmp_path):
    import ray

    from rlhf_system.distributed.placement import cpus_needed, start_roles, stop_roles
    from rlhf_system.workers.actor import ActorWorker
    from rlhf_system.workers.reference import ReferenceWorker
    from rlhf_system.workers.reward import RewardWorker

    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, model__reward_path=str(small_model["reward"]),
                     rewards__use_model=True, algorithm__estimator="rloo",
                     placement__colocate=[["actor", "reference"]])
    classes = {"actor": ActorWorker, "reference": ReferenceWorker, "reward": RewardWorker}
    assert cpus_needed(cfg, list(classes)) == 2  # actor + reference count once
    groups, shared = start_roles(cfg, classes)
    try:
        assert len(shared) == 1
        assert groups["actor"].pg is groups["reference"].pg is shared[0]
        assert groups["reward"].pg is not shared[0]
        table = ray.util.placement_group_table(shared[0])
        assert table["state"] == "CREATED" and len(table["bundles"]) == 1
        # both colocated workers are alive and answer (they took half a bundle each)
        assert groups["actor"].call("master_endpoint")[0][1] > 0
        assert groups["reference"].call("master_endpoint")[0][1] > 0
    finally:
        stop_roles(groups, shared)


def test_unplaceable_request_fails_before_workers_start(ray_cluster, small_model, synthetic_dir, tmp_path):
    from rlhf_system.config import ConfigError
    from rlhf_system.distributed.placement import start_roles
    from rlhf_system.workers.actor import ActorWorker

    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, placement__actor=8,
                     train__global_batch_size=64, train__rollout_batch_size=32, algorithm__estimator="rloo")
    with pytest.raises(ConfigError, match="role 'actor' needs 8 CPU"):
        start_roles(cfg, {"actor": ActorWorker})
