"""ZeRO-3 partitioned loading: no rank ever holds the whole model, from the load to the export.

A ~100M-parameter random Llama, built here (a whole copy, 0.4 GB, would show), loads into two actor
ranks under ZeRO-3 through DeepSpeed's partitioned init (transformers' HfDeepSpeedConfig): each rank's
module holds 0-size placeholders and the rank its half of every parameter. The export then gathers
and writes one shard at a time, and the shards load back to exactly the weights that went in.
"""

import math

import pytest
import torch

from tests.integration.conftest import ppo_config


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    from rlhf_system.models.tiny import TinySpec, make_tiny_model

    spec = TinySpec(vocab_size=1024, hidden_size=1024, num_heads=16, num_kv_heads=16, num_layers=8,
                    intermediate_size=2816)
    return make_tiny_model(tmp_path_factory.mktemp("big"), spec)


def test_two_ranks_each_hold_half_and_export_shard_by_shard(ray_cluster, big_model, synthetic_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_system.placement.roles import start_roles, stop_roles
    from rlhf_system.workers.actor import ActorWorker

    cfg = ppo_config(big_model["policy"], synthetic_dir, tmp_path, placement__actor=2, deepspeed__zero_stage=3,
                     checkpoint__export_shard_mb=100)
    groups, shared = start_roles(cfg, {"actor": ActorWorker})
    try:
        actor = groups["actor"]
        actor.call("setup", cfg, 10)
        by_rank = actor.call("partitions")
        full = sum(n for _, n, _, _ in by_rank[0])
        assert full > 90e6, full
        for rank, parts in enumerate(by_rank):
            for name, numel, local, held in parts:
                assert held == 0, f"rank {rank} holds all of {name} ({held} values)"
                assert local == math.ceil(numel / 2), f"rank {rank}: {name} partition {local} of {numel}"
        out = tmp_path / "hf"
        actor.call("save_hf", str(out))
    finally:
        stop_roles(groups, shared)

    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 4 and (out / "model.safetensors.index.json").is_file(), sorted(p.name for p in out.iterdir())
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = AutoModelForCausalLM.from_pretrained(big_model["policy"]).state_dict()
    assert exported.keys() == original.keys()
    for k in original:
        assert torch.equal(exported[k], original[k]), k
