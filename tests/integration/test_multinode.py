"""PPO across two Ray nodes: two `ray start` processes on this machine (ray_nodes.py), each with 2 CPUs
and a resource naming it. placement.actor=2 with strategy STRICT_SPREAD must put the actor's two ranks
on different nodes (DeepSpeed's gloo group then spans them), and the three trainer workers cannot fit
on one 2-CPU node, so the roles use both. The controller runs as a separate driver process that
connects through RAY_ADDRESS, as it would on a real cluster; each worker reports its node from inside
(ray.get_runtime_context().get_node_id()) and that is checked against the placement group table.

Run as a module (`python -m tests.integration.test_multinode CONFIG OUT`), this file is that driver."""

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO, ppo_config
from tests.integration.ray_nodes import start_cluster, stop_cluster

pytestmark = pytest.mark.integration

NODES = ("rlhf_node_a", "rlhf_node_b")


@pytest.fixture(scope="module")
def two_nodes():
    cluster = start_cluster([{"num_cpus": 2, "resources": {NODES[0]: 1}},
                             {"num_cpus": 2, "resources": {NODES[1]: 1}}])
    yield cluster
    stop_cluster(cluster)


def test_ppo_step_with_roles_spread_over_two_nodes(two_nodes, family_models, synthetic_dir, tmp_path):
    """RLOO on a tiny Llama-3 (its own chat template; models/families.py), roles spread over two hosts."""
    cfg = ppo_config(family_models["llama3"]["policy"], synthetic_dir, tmp_path / "run", algorithm__estimator="rloo",
                     placement__nodes=2, placement__actor=2, placement__strategy="STRICT_SPREAD",
                     placement__timeout_s=60, data__eval=[])
    config, report = tmp_path / "config.yaml", tmp_path / "report.json"
    cfg.dump(config)
    env = dict(two_nodes.env, RAY_ADDRESS=two_nodes.gcs_address)
    out = subprocess.run([sys.executable, "-m", "tests.integration.test_multinode", str(config), str(report)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:] + two_nodes.log_tail(1500)
    seen = json.loads(report.read_text())

    assert seen["result"]["steps"] == 1 and sorted(seen["result"]["roles"]) == ["actor", "reference", "rollout"]
    assert sorted(seen["nodes"].values()) == sorted(NODES)
    actor, reference = seen["roles"]["actor"], seen["roles"]["reference"]
    # what the workers say about themselves agrees with where the placement groups put their bundles
    for role in (actor, reference):
        assert role["workers"] == [role["bundles"][str(i)] for i in range(len(role["workers"]))]
    label = seen["nodes"]
    assert sorted(label[n] for n in actor["workers"]) == sorted(NODES)  # STRICT_SPREAD: one rank per node
    assert {label[n] for n in actor["workers"] + reference["workers"]} == set(NODES)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 1 and "actor/loss" in r for r in rows)


# ------------------------------------------------------------------------------------- the driver
def _wait_for_nodes(n: int, deadline_s: float = 60) -> None:
    import time

    import ray

    deadline = time.monotonic() + deadline_s
    while sum(node["Alive"] for node in ray.nodes()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} Ray nodes alive after {deadline_s:g}s: {ray.nodes()}")
        time.sleep(1)


def main(config: str, report: str) -> None:
    """ppo.run on the cluster at RAY_ADDRESS; records, for every trainer worker, the node it runs on."""
    import ray

    from rlhf_system.config import load_config
    from rlhf_system.placement import roles as placement
    from rlhf_system.placement.group import ensure_ray
    from rlhf_system.trainers import ppo

    ensure_ray()  # the controller's own way in: ray.init(address=$RAY_ADDRESS)
    _wait_for_nodes(2)
    roles: dict = {}
    start_roles = placement.start_roles

    def node_id(worker) -> str:  # runs inside the worker (`__ray_call__` passes the worker instance)
        return ray.get_runtime_context().get_node_id()

    def recording_start_roles(cfg, classes):
        groups, shared = start_roles(cfg, classes)
        for role, g in groups.items():
            roles[role] = {"workers": ray.get([w.__ray_call__.remote(node_id) for w in g.workers], timeout=120),
                           "bundles": ray.util.placement_group_table(g.pg)["bundles_to_node_id"]}
        return groups, shared

    placement.start_roles = recording_start_roles  # ppo.start looks it up when it runs
    result = ppo.run(load_config(config))
    nodes = {n["NodeID"]: next(r for r in n["Resources"] if r in NODES) for n in ray.nodes() if n["Alive"]}
    with open(report, "w") as f:
        json.dump({"result": result, "roles": roles, "nodes": nodes}, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:3])
