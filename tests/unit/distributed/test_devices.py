"""GPU-path decisions checked on CPU: where collectives reduce, which backend and dtype a placement gets,
and that a CPU placement's workers never see a GPU, even on a host that has them (a faked device count).

Each test here failed against the code before the fix it covers (issue 22, items 1, 2 and 4).
"""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rlhf_system.config import ConfigError, RunConfig, load_config
from rlhf_system.distributed import devices

PKG = Path(__file__).resolve().parents[3] / "rlhf_system"
COLLECTIVES = {"all_reduce", "all_gather", "reduce", "broadcast", "reduce_scatter", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_to_all"}


def _collective_calls(tree: ast.AST) -> list[str]:
    """`dist.<collective>(...)` / `torch.distributed.<collective>(...)` calls in a module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            base = ast.unparse(node.func.value)
            if base in ("dist", "torch.distributed"):
                out.append(f"{base}.{node.func.attr} (line {node.lineno})")
    return out


def test_every_default_group_collective_goes_through_the_device_helper():
    """Under NCCL a CPU tensor cannot be reduced. Workers reduce loss sums and counts built on the CPU, so
    each reduction must go through devices.all_reduce_sum, which moves it to the engine's device. Before
    the fix sft.py, reward_model.py, dpo.py and update.py (now supervised.py for the first three) called dist.all_reduce on CPU tensors."""
    offenders = {}
    for path in PKG.rglob("*.py"):
        if path.name == "devices.py":
            continue
        calls = _collective_calls(ast.parse(path.read_text()))
        if calls:
            offenders[str(path.relative_to(PKG))] = calls
    assert not offenders, f"collectives on the default group outside distributed/devices.py: {offenders}"


def test_all_reduce_sum_reduces_on_the_engine_device_and_returns_to_the_caller():
    """A fake CUDA device (FakeTensorMode needs no GPU): the tensor handed to the collective is on the
    engine's device, the result comes back where the caller's tensor lives."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []
    orig = dist.all_reduce
    try:
        dist.all_reduce = lambda t, *a, **k: seen.append(t.device)
        with FakeTensorMode(allow_non_fake_inputs=True):
            out = devices.all_reduce_sum(torch.zeros(3, dtype=torch.float64), torch.device("cuda", 3))
            assert out.device.type == "cpu" and out.dtype == torch.float64
    finally:
        dist.all_reduce = orig
    assert seen == [torch.device("cuda", 3)]


def test_workers_reduce_with_their_engine_device():
    """Each worker's reductions name its engine's device (not a fixed "cuda" or the tensor's own)."""
    for rel in ("workers/sft.py", "workers/supervised.py", "workers/dpo.py", "workers/update.py"):
        tree = ast.parse((PKG / rel).read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "all_reduce_sum"]
        assert calls, rel
        for c in calls:
            assert ast.unparse(c.args[1]).endswith("engine.device"), f"{rel}:{c.lineno}: {ast.unparse(c)}"


# ------------------------------------------------------------------------------------- placement
@pytest.fixture
def eight_gpus(monkeypatch):
    """This process looks like a host with 8 CUDA devices (it has none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)


def test_dtype_and_backend_follow_the_placement_not_the_host(eight_gpus):
    cpu = RunConfig()
    gpu = RunConfig(placement={"gpus_per_node": 8})
    assert cpu.train_dtype() == "float32" and gpu.train_dtype() == "bfloat16"
    assert devices.dist_backend(devices.on_gpu(cpu.placement)) == "gloo"
    assert devices.dist_backend(devices.on_gpu(gpu.placement)) == "nccl"
    # an explicit dtype is never second-guessed
    assert RunConfig(model={"dtype": "float32"}, placement={"gpus_per_node": 8}).train_dtype() == "float32"


def test_cpu_placement_starts_workers_and_engines_with_gpus_hidden(eight_gpus):
    from rlhf_system.placement.engines import actor_options, engine_plans

    cfg = RunConfig(mode="ppo")
    assert devices.worker_env(cfg.placement) == {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    for plan in engine_plans(cfg):
        assert actor_options(plan, None)["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == ""
    gpu = RunConfig(mode="ppo", placement={"gpus_per_node": 8})
    assert devices.worker_env(gpu.placement) == {}
    assert all("runtime_env" not in actor_options(plan, None) for plan in engine_plans(gpu))


def test_in_process_worker_of_a_cpu_placement_joins_gloo_on_a_gpu_host(eight_gpus, monkeypatch):
    """LocalGroup on a host that reports 8 GPUs: before the fix the worker chose NCCL (from
    torch.cuda.is_available()) and failed to join; now the placement decides, and the GPUs are hidden."""
    from rlhf_system.placement.group import LocalGroup
    from rlhf_system.workers.base import BaseWorker

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    group = LocalGroup("actor", BaseWorker, RunConfig().placement)
    try:
        assert dist.get_backend() == "gloo"
        import os

        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    finally:
        group.shutdown()


def test_in_process_worker_cannot_hide_gpus_once_cuda_is_initialised(eight_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ConfigError, match="placement.gpus_per_node=0 but this process already uses CUDA"):
        devices.hide_gpus_here()


# ------------------------------------------------------------------------------------- deepspeed
def test_optimizer_offload_needs_a_zero_stage(tmp_path):
    """DeepSpeedCPUAdam over stage-0 (GPU-resident) states asserts at the first step: refused up front."""
    p = tmp_path / "c.yaml"
    p.write_text("mode: sft\ndata: {train: [{path: t.jsonl}]}\n")
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer=true needs deepspeed.zero_stage 1, 2 or 3"):
        load_config(p, ["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"])
    assert load_config(p, ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]).deepspeed.offload_optimizer


def test_an_in_process_worker_never_imports_ray():
    """The local launcher runs where Ray is not installed (a GPU image with torch alone): joining the
    process group must not import it."""
    import subprocess
    import sys

    code = ("import sys; from rlhf_system.distributed.net import pin_gloo_interface; "
            "assert pin_gloo_interface() is None; assert 'ray' not in sys.modules")
    env = {k: v for k, v in __import__("os").environ.items() if k != "GLOO_SOCKET_IFNAME"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
