"""Role placement on a real (local) Ray cluster: colocated roles share one placement group, each worker
taking its share of a bundle; separate roles get their own; an impossible request fails before any
worker starts."""

import pytest

from tests.integration.conftest import ppo_config


def test_colocated_roles_share_a_placement_group(ray_cluster, small_model, synthetic_dir, tmp_path):
    import ray

    from rlhf_system.placement.roles import cpus_needed, start_roles, stop_roles
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
    from rlhf_system.placement.roles import start_roles
    from rlhf_system.workers.actor import ActorWorker

    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, placement__actor=8,
                     train__global_batch_size=64, train__rollout_batch_size=32, algorithm__estimator="rloo")
    with pytest.raises(ConfigError, match="role 'actor' needs 8 CPU"):
        start_roles(cfg, {"actor": ActorWorker})


@pytest.mark.parametrize("colocate", [False, True])
def test_strict_spread_over_too_few_nodes_fails_at_once(ray_cluster, small_model, synthetic_dir, tmp_path, colocate):
    """The test cluster is one node with 4 CPUs: 2 CPUs fit in total, but STRICT_SPREAD wants 2 nodes.
    Ray alone would keep the placement group pending for placement.timeout_s (an hour here)."""
    from rlhf_system.config import ConfigError
    from rlhf_system.placement.roles import start_roles
    from rlhf_system.workers.actor import ActorWorker
    from rlhf_system.workers.reference import ReferenceWorker

    over = {"placement__colocate": [["actor", "reference"]], "placement__reference": 2} if colocate else {}
    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, placement__actor=2,
                     placement__strategy="STRICT_SPREAD", placement__timeout_s=3600, algorithm__estimator="rloo",
                     **over)
    roles = {"actor": ActorWorker, "reference": ReferenceWorker} if colocate else {"actor": ActorWorker}
    with pytest.raises(ConfigError, match=r"2 workers under STRICT_SPREAD \(one node each\) but only 1 of the "
                                          r"cluster's 1 nodes can hold one"):
        start_roles(cfg, roles)


@pytest.mark.parametrize("actors,override", [(1, 0), (2, 0), (1, 3)], ids=["one-rank", "two-ranks", "override"])
def test_trainer_workers_compute_with_the_cores_the_placement_gives(ray_cluster, small_model, synthetic_dir,
                                                                    tmp_path, actors, override):
    """On a CPU-only node the roles take turns, so a role's ranks share all of the node's cores (Ray alone
    would leave each at one thread: it sets OMP_NUM_THREADS from num_cpus); the knob overrides."""
    from rlhf_system.distributed.threads import node_cores
    from rlhf_system.placement.roles import start_roles, stop_roles
    from rlhf_system.workers.actor import ActorWorker

    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, placement__actor=actors,
                     placement__threads_per_worker=override, algorithm__estimator="rloo")
    groups, shared = start_roles(cfg, {"actor": ActorWorker})
    try:
        reported = groups["actor"].call("num_threads")  # torch.get_num_threads() inside each worker
    finally:
        stop_roles(groups, shared)
    want = override or max(1, len(node_cores()) // actors)
    assert reported == [want] * actors
