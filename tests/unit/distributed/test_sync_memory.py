"""Weight sync's memory bound, the parts that need no engine: the bucket plan (a tensor larger than a
bucket travels alone), the check of a bucket size the user set, made before workers start, and the
peak-memory meter both sides report with."""

import pytest
import torch

from rlhf_system.config import ConfigError
from rlhf_system.distributed.weight_sync import TensorMeta, check_bucket_size, plan_buckets

MB = 2**20


def test_plan_fills_buckets_in_order_and_never_exceeds_the_size():
    metas = [TensorMeta(f"w{i}", "float32", (MB // 16,)) for i in range(10)]  # 0.25 MB each
    plan = plan_buckets(metas, MB)
    assert [m.name for b in plan for m in b] == [m.name for m in metas]
    assert [len(b) for b in plan] == [4, 4, 2]
    assert all(sum(m.nbytes for m in b) <= MB for b in plan)


def test_plan_starts_a_bucket_on_dtype_change():
    metas = [TensorMeta("a", "float32", (4,)), TensorMeta("b", "bfloat16", (4,)), TensorMeta("c", "bfloat16", (4,))]
    assert [[m.name for m in b] for b in plan_buckets(metas, MB)] == [["a"], ["b", "c"]]


def test_a_tensor_larger_than_a_bucket_travels_alone():
    """As verl and OpenRLHF send it: the bound on a sync's extra memory is then max(bucket, that tensor)."""
    metas = [TensorMeta("a", "float32", (4,)), TensorMeta("model.embed_tokens.weight", "float32", (1024, 512)),
             TensorMeta("b", "float32", (4,)), TensorMeta("c", "float32", (4,))]
    assert [[m.name for m in b] for b in plan_buckets(metas, MB)] == [["a"], ["model.embed_tokens.weight"], ["b", "c"]]


def test_llama3_8b_plan_at_the_default_bucket_sends_only_oversize_tensors_alone():
    """The real parameter list (meta device): 64 MB buckets, each vocabulary tensor (1002 MB in bf16) and
    each MLP matrix (112 MB) alone, every tensor sent once, in order."""
    from tests.fake_checkpoints import meta_model

    metas = [TensorMeta(n, "bfloat16", tuple(p.shape)) for n, p in meta_model("llama3-8b").named_parameters()]
    plan = plan_buckets(metas, 64 * MB)
    assert [m.name for b in plan for m in b] == [m.name for m in metas]
    over = [b for b in plan if sum(m.nbytes for m in b) > 64 * MB]
    assert all(len(b) == 1 for b in over)
    assert {b[0].name.rsplit(".", 2)[-2] for b in over} == {"embed_tokens", "lm_head", "gate_proj", "up_proj", "down_proj"}
    assert max(sum(m.nbytes for m in b) for b in plan) == 128256 * 4096 * 2


def test_bucket_size_is_checked_from_the_checkpoint_headers(tmp_path):
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(512, 1024), "norm.weight": torch.zeros(512)}, tmp_path / "model.safetensors")
    check_bucket_size(str(tmp_path), 2 * MB, 4)  # 2 MB in fp32: fits exactly
    check_bucket_size(str(tmp_path), MB, 2)      # in bf16 it is 1 MB
    with pytest.raises(ConfigError, match=r"rollout\.sync_bucket_mb=1 is smaller than the model's tensor lm_head\.weight"):
        check_bucket_size(str(tmp_path), MB, 4)


METER = """
import json, torch
from rlhf_system.distributed.memory import PeakMemory
MB = 2**20
held = torch.ones(32 * MB // 4)  # 32 MB resident before the blocks: not part of their rise
with PeakMemory("cpu") as quiet:
    pass
with PeakMemory("cpu") as busy:
    t = torch.ones(64 * MB // 4)  # 64 MB, touched, then freed inside the block
    del t
print(json.dumps([quiet.rise, busy.rise, float(held.sum())]))
"""


def test_peak_memory_sees_a_transient_allocation_and_not_what_was_held_before():
    """In a fresh process: the meter reads the rise above what is resident, and a long-lived process
    (this test session) may already hold freed memory that a new allocation reuses without a rise."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", METER], capture_output=True, text=True, timeout=120, check=True)
    quiet, busy, _ = json.loads(out.stdout.strip().splitlines()[-1])
    if busy is None:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert busy >= 60 * MB, busy
    assert quiet < 16 * MB, quiet


def test_buckets_hold_whole_decoder_layers_where_one_fits():
    """A layer split across buckets would keep the first bucket alive in the engine until the rest came."""
    q = MB // 4 // 5  # 0.2 MB of fp32
    metas = [TensorMeta("model.embed_tokens.weight", "float32", (3 * q // 2,))]  # 0.3 MB
    for i in range(2):
        metas += [TensorMeta(f"model.layers.{i}.self_attn.{p}_proj.weight", "float32", (q,)) for p in "qkvo"]
    metas.append(TensorMeta("model.norm.weight", "float32", (8,)))
    plan = plan_buckets(metas, MB)
    assert [[m.name.split(".")[2] if "layers" in m.name else m.name for m in b] for b in plan] == [
        ["model.embed_tokens.weight"], ["0"] * 4, ["1"] * 4 + ["model.norm.weight"]]
    # a layer bigger than a bucket is split between its tensors
    split = plan_buckets(metas, MB // 2)
    assert all(sum(m.nbytes for m in b) <= MB // 2 for b in split) and len(split) == 5


def test_a_measured_block_does_not_erase_the_process_peak():
    """PeakMemory resets the kernel's high-water mark; the workers' peak_memory_mb reads the same counter,
    so the peak from before the block must survive it."""
    import os

    from rlhf_system.distributed.memory import PeakMemory, _status_bytes, process_peak_bytes

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc")
    big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
    big += 1
    before = process_peak_bytes()
    del big
    with PeakMemory() as peak:
        pass
    assert peak.rise is not None and peak.rise < 64 * 2**20  # the block itself needed little
    assert _status_bytes("VmHWM") < before - 128 * 2**20  # the kernel's counter was reset: the case at hand
    # the kernel's RSS counters are cached per thread, so two readings may differ by a few pages
    assert before >= 256 * 2**20 and process_peak_bytes() >= before - 4 * 2**20
