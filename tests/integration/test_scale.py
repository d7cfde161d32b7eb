"""`rlhf bench scale` on a real two-node Ray cluster, submitted as a Ray Job through launch/ray_submit.sh.

The two nodes are two hosts with their own addresses: network namespaces joined by a bridge, made by
this test (netns.py), each running `ray start` at its own address, and all torn down afterwards. Ray,
DeepSpeed's gloo group, the weight-sync group and vLLM then talk across hosts as on separate machines.
Where namespaces cannot be made (no root), the nodes fall back to loopback and the test says so.

The sweep is the shipped configs/bench/scale-2node-cpu.yaml less its one-rank baselines (SFT with 2 ranks
packed on one node and 2 spread over both; GRPO with 2 actor ranks spread), one timed step per point: it
must complete with a JSON line and a report row per point, and the spread points must have used both
nodes.
"""

import json
import warnings

import pytest

from tests.integration import netns
from tests.integration.ray_nodes import start_cluster, stop_cluster
from tests.integration.test_ray_submit import job_status, submit

pytestmark = pytest.mark.integration
SWEEP = "configs/bench/scale-2node-cpu.yaml"


def spread_points(tmp_path):
    """The shipped sweep without its one-rank points (the one-node baselines), which need no second host:
    what this test is about is the packed and the spread two-rank points."""
    import yaml

    doc = yaml.safe_load(open(SWEEP))
    for sweep in doc["sweeps"]:
        sweep["points"] = [p for p in sweep["points"] if "placement.actor=1" not in p]
    path = tmp_path / "scale-2node-spread.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def two_hosts():
    why = netns.available()
    if why is not None:
        warnings.warn(f"network namespaces cannot be made here ({why}): two Ray nodes on loopback instead",
                      stacklevel=1)
    hosts = netns.make_hosts(2) if why is None else None
    try:
        cluster = start_cluster([{"num_cpus": 4}, {"num_cpus": 4}], dashboard=True, hosts=hosts)
        try:
            yield cluster, hosts
        finally:
            stop_cluster(cluster)
    finally:
        if hosts is not None:
            netns.remove_hosts(hosts)


def test_scale_sweep_runs_as_a_ray_job_across_two_hosts(two_hosts, small_model, synthetic_dir, tmp_path):
    cluster, hosts = two_hosts
    if hosts is not None:
        assert cluster.gcs_address.startswith(hosts.addrs[0] + ":")  # the head is host 0, not loopback
    out_dir, d = tmp_path / "scale", synthetic_dir
    out, job_id = submit(
        cluster, "--no-upload", "--",
        "rlhf", "bench", "scale", "--config", str(spread_points(tmp_path)), "--steps", "1", "--out", str(out_dir),
        f"model.path={small_model['policy']}", "logging.console=false",
        f"sft:data.train=[{{path: {d / 'sft_train.jsonl'}}}]", f"ppo:data.train=[{{path: {d / 'rl_train.jsonl'}}}]",
        # smaller PPO batches than the file's: the points' placements are what is tested, not their speed
        "ppo:rollout.n_samples_per_prompt=2", "ppo:train.global_batch_size=16", "ppo:train.micro_batch_size=8",
        "ppo:rollout.max_new_tokens=8", timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert job_status(cluster, job_id) == "SUCCEEDED"

    rows = [json.loads(line) for line in (out_dir / "scale.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["label"]) for r in rows] == [
        ("sft", "placement.actor=2 placement.strategy=PACK"), ("sft", "placement.actor=2 placement.strategy=STRICT_SPREAD"),
        ("ppo", "placement.actor=2 placement.strategy=STRICT_SPREAD")]
    assert not [r for r in rows if "error" in r], rows
    by_label = {(r["kind"], r["label"]): r for r in rows}
    assert by_label[("sft", "placement.actor=2 placement.strategy=STRICT_SPREAD")]["nodes"] == 2
    assert by_label[("sft", "placement.actor=2 placement.strategy=PACK")]["nodes"] == 1
    assert by_label[("ppo", "placement.actor=2 placement.strategy=STRICT_SPREAD")]["nodes"] == 2
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["efficiency"] > 0 and r["steps"] == 1
        assert all(m > 0 for ranks in r["peak_memory_mb"].values() for m in ranks)
        assert len(r["peak_memory_mb"]["actor"]) == int(r["label"].split("placement.actor=")[1][0])
    ppo = [r for r in rows if r["kind"] == "ppo"]
    assert all(r["sync"]["bytes"] > 0 and r["sync"]["seconds"] > 0 for r in ppo)
    assert rows[0]["efficiency"] == rows[2]["efficiency"] == 1.0  # each kind against its own first point

    table = (out_dir / "scale.md").read_text()
    assert sum(line.startswith(f"| {r['point']} | ") for line in table.splitlines() for r in rows) == len(rows)
    for png in ("throughput.png", "efficiency.png", "memory.png"):
        assert (out_dir / png).stat().st_size > 1000, png
    # the job's stdout (streamed by the launcher) carries the JSON lines
    streamed = [line for line in out.stdout.splitlines() if '"point"' in line]
    assert [json.loads(line) for line in streamed] == rows, streamed
