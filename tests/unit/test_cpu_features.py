"""`model.dtype: auto` on CPU follows the processor's bf16 matrix instructions (cpu_features.py)."""

import pytest
import torch

from rlhf_system import cpu_features
from rlhf_system.config import ModelConfig, RunConfig


@pytest.fixture
def caps(monkeypatch):
    """Set the capabilities torch's cpuinfo probe reports."""
    def set_caps(**flags):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"cpu_name": "test CPU", **flags})
        cpu_features.cpu_bf16.cache_clear()
    yield set_caps
    cpu_features.cpu_bf16.cache_clear()


@pytest.mark.parametrize("flags,want", [
    ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, "float32"),   # this project's EPYC hosts
    ({"avx512_f": True, "avx512_bf16": True}, "bfloat16"),                 # Cooper Lake, Zen 4
    ({"amx_bf16": True, "amx_tile": True, "avx512_bf16": True}, "bfloat16"),  # Sapphire Rapids
    ({"bf16": True, "architecture": "arm64"}, "bfloat16"),                 # Graviton 3, Neoverse V1
])
def test_auto_resolves_by_the_cpu(caps, caplog, flags, want):
    caps(**flags)
    with caplog.at_level("INFO", logger="rlhf_system.cpu_features"):
        assert ModelConfig(dtype="auto").resolved_dtype(gpu=False) == want
        assert RunConfig().train_dtype() == want  # gpus_per_node=0: the CPU's answer
    assert caplog.text.count("model.dtype auto ->") == 1  # logged once, whoever asks again


def test_explicit_dtype_and_gpus_do_not_ask_the_cpu(caps):
    caps(amx_bf16=True)
    assert ModelConfig(dtype="float32").resolved_dtype(gpu=False) == "float32"
    caps()
    assert ModelConfig(dtype="auto").resolved_dtype(gpu=True) == "bfloat16"


def test_this_host_answer_matches_its_flags():
    """No fake: what the real probe says agrees with /proc/cpuinfo where the kernel lists flags."""
    from pathlib import Path

    cpu_features.cpu_bf16.cache_clear()
    info = Path("/proc/cpuinfo")
    if not info.exists() or "flags" not in info.read_text():
        pytest.skip("no x86 /proc/cpuinfo flags here")
    line = next(x for x in info.read_text().splitlines() if x.startswith("flags"))
    flags = set(line.split(":")[1].split())
    assert cpu_features.cpu_bf16() == bool(flags & {"amx_bf16", "avx512_bf16"})
