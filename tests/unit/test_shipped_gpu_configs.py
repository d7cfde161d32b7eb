"""The shipped GPU configs pass the driver's model checks (trainers/preflight.py) against checkpoints of
the architectures they name: fake ones (tests/fake_checkpoints.py) with the real parameter names and
shapes in sparse safetensors files, so nothing is downloaded or loaded. A config that a start-up check
would refuse (a weight-sync bucket smaller than Llama-3's embedding, say) fails here, on a CPU machine.
"""

import importlib.machinery
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from rlhf_system.bench.scale import expand, load_sweep
from rlhf_system.config import ConfigError, load_config
from rlhf_system.trainers.preflight import preflight_model
from tests.fake_checkpoints import ARCHITECTURES, meta_model, write_fake_checkpoint

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "configs/bench/scale-8b-2x8gpu.yaml"
PATH_FIELDS = ("path", "reward_path", "critic_path", "reference_path", "tokenizer_path")
# The shipped configs' model paths -> the architecture behind each. A new path fails the test until added.
ARCH_OF = {
    "/shared/models/Meta-Llama-3-8B": "llama3-8b",
    "/models/Meta-Llama-3-8B": "llama3-8b",
    "/shared/runs/llama3-8b-sft/hf": "llama3-8b",       # an SFT export of Llama-3-8B
    "/shared/models/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "/shared/runs/llama2-13b-rm/hf": "llama2-13b-rm",   # a Llama-2-13B reward model (sequence classifier)
}


def gpu_configs() -> list[Path]:
    out = []
    for f in sorted(REPO.glob("configs/*/*.yaml")):
        if f.parent.name == "bench":
            continue  # sweep files, not run configs: their GPU points are checked below
        cfg = load_config(f)
        if cfg.placement.gpus_per_node > 0:
            out.append(f)
    return out


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fake_checkpoints")
    return {arch: str(write_fake_checkpoint(root / arch, arch)) for arch in ARCHITECTURES}


@pytest.fixture
def flash_attn_installed(monkeypatch):
    """This machine has no flash-attn; the shipped configs are checked as on their GPU image, which has it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        importlib.machinery.ModuleSpec(name, None) if name == "flash_attn" else real(name, *a)))


def point_at_fakes(cfg, fakes: dict[str, str]):
    for field in PATH_FIELDS:
        path = getattr(cfg.model, field)
        if path:
            assert path in ARCH_OF, f"model.{field}={path}: add its architecture to ARCH_OF"
            setattr(cfg.model, field, fakes[ARCH_OF[path]])
    return cfg


def test_the_shipped_gpu_configs_are_the_ones_expected():
    names = {f"{f.parent.name}/{f.name}" for f in gpu_configs()}
    assert names == {"sft/llama3-8b-2x8gpu.yaml", "sft/qlora-8b-1gpu.yaml", "rm/llama3-8b-2x8gpu.yaml",
                     "dpo/llama3-8b-2x8gpu.yaml", "ppo/llama3-8b-colocated-2x8gpu.yaml",
                     "ppo/llama3-8b-rm13b-2x8gpu.yaml", "grpo/qwen-7b-math-2x8gpu.yaml",
                     "grpo/qwen-7b-math-hybrid-1x8gpu.yaml"}


@pytest.mark.parametrize("config", gpu_configs(), ids=lambda f: f"{f.parent.name}/{f.name}")
def test_shipped_gpu_config_passes_the_model_preflight(config, fakes, flash_attn_installed):
    preflight_model(point_at_fakes(load_config(config), fakes))


def test_every_gpu_point_of_the_8b_sweep_passes_the_model_preflight(fakes, flash_attn_installed):
    points = expand(load_sweep(str(SWEEP)), [], str(SWEEP))
    assert len(points) == 7
    for p in points:
        preflight_model(point_at_fakes(p.cfg, fakes))


def test_flash_attention_without_flash_attn_is_refused_naming_the_fix(fakes, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    cfg = point_at_fakes(load_config(REPO / "configs/sft/llama3-8b-2x8gpu.yaml"), fakes)
    with pytest.raises(ConfigError, match=r"^model\.attn_implementation=flash_attention_2 needs flash-attn.*"
                                          r"model\.attn_implementation=sdpa$"):
        preflight_model(cfg)
    cfg.model.attn_implementation = "sdpa"
    preflight_model(cfg)


def test_a_sync_bucket_the_user_set_below_the_embedding_is_refused(fakes, flash_attn_installed):
    """Unset, the 1 GB embedding travels alone; set, the bucket is a bound the run must keep."""
    cfg = point_at_fakes(load_config(REPO / "configs/grpo/qwen-7b-math-2x8gpu.yaml", ["rollout.sync_bucket_mb=64"]),
                         fakes)
    with pytest.raises(ConfigError, match=r"rollout\.sync_bucket_mb=64 is smaller than the model's tensor "
                                          r"(model\.embed_tokens|lm_head)\.weight \(1039\.50 MB\)\. "
                                          r"Fix: rollout\.sync_bucket_mb=1040 or more"):
        preflight_model(cfg)
    cfg = load_config(REPO / "configs/grpo/qwen-7b-math-2x8gpu.yaml", ["rollout.sync_bucket_mb=1040"])
    preflight_model(point_at_fakes(cfg, fakes))


def test_fake_checkpoint_has_the_real_names_and_shapes_in_sparse_shards(fakes):
    from safetensors import safe_open

    folder = Path(fakes["qwen2.5-7b"])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) == 4 and set(index["weight_map"].values()) == {f.name for f in shards}
    shapes = {}
    for f in shards:
        assert os.stat(f).st_blocks * 512 < 2**20 < f.stat().st_size  # a hole: no data written
        with safe_open(str(f), "pt") as st:
            shapes |= {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    expected = {k: tuple(v.shape) for k, v in meta_model("qwen2.5-7b").state_dict().items()}
    assert shapes == expected and set(index["weight_map"]) == set(expected)
    assert shapes["model.layers.0.self_attn.q_proj.bias"] == (3584,) and shapes["lm_head.weight"] == (152064, 3584)
    assert index["metadata"]["total_size"] == 2 * sum(map(math.prod, shapes.values()))  # bf16
    assert sum(map(math.prod, shapes.values())) == 7_615_616_512  # Qwen2.5-7B's published parameter count

