"""model.reference_quant / model.reward_quant: quantised loading of PPO's frozen roles, validated once,
and the one-line bitsandbytes error (models/load.check_bitsandbytes)."""

import sys

import pytest

from rlhf_system.config import ConfigError, load_config

PPO = ["data.train=[{path: rl.jsonl}]", "rewards.use_model=true", "model.reward_path=rm", "train.rollout_batch_size=8",
       "train.global_batch_size=16", "train.micro_batch_size=8", "rollout.n_samples_per_prompt=2"]


def test_defaults_are_full_precision():
    cfg = load_config(None, PPO, mode="ppo")
    assert cfg.model.reference_quant == "none" and cfg.model.reward_quant == "none"


@pytest.mark.parametrize("value", ["4bit", "8bit"])
def test_quantised_frozen_roles_validate(value):
    cfg = load_config(None, PPO + [f"model.reference_quant={value}", f"model.reward_quant={value}"], mode="ppo")
    assert (cfg.model.reference_quant, cfg.model.reward_quant) == (value, value)


@pytest.mark.parametrize("overrides,mode,needle", [
    (["model.reference_quant=2bit"], "ppo", "config field 'model.reference_quant'"),
    (["model.reward_quant=4bit", "rewards.use_model=false", "rewards.rules=[synthetic]"], "ppo",
     "model.reward_quant=4bit quantises PPO's frozen reward role, which this ppo run does not start"),
    (["model.reference_quant=8bit", "algorithm.kl.coef=0"], "ppo", "frozen reference role, which this ppo run"),
    (["model.reference_quant=4bit", "deepspeed.frozen_zero_stage=3"], "ppo", "deepspeed.frozen_zero_stage=3"),
    (["model.reward_quant=4bit"], "sft", "which this sft run does not start"),
])
def test_invalid_combinations_are_errors(overrides, mode, needle):
    base = PPO if mode == "ppo" else ["data.train=[{path: sft.jsonl}]", "train.global_batch_size=8",
                                      "train.micro_batch_size=4"]
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")) as e:
        load_config(None, base + overrides, mode=mode)
    assert str(e.value).count("\n") == 0


def test_bitsandbytes_that_cannot_load_is_one_line(monkeypatch):
    from rlhf_system.models.load import check_bitsandbytes

    check_bitsandbytes("none", "--quant")  # never touches bitsandbytes
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as on a machine without it
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ConfigError) as e:
        check_bitsandbytes("4bit", "model.reference_quant")
    msg = str(e.value)
    assert msg.startswith("model.reference_quant=4bit needs bitsandbytes") and "Fix:" in msg and "\n" not in msg


def test_fp16_on_a_device_without_fp16_is_a_config_error():
    from deepspeed.accelerator import get_accelerator

    from rlhf_system.models.load import check_dtype_supported

    for ok in ("float32", "bfloat16"):
        check_dtype_supported(ok)
    if get_accelerator().is_fp16_supported():  # a GPU, or a CPU with fp16 kernels: nothing to refuse
        check_dtype_supported("float16")
    else:
        with pytest.raises(ConfigError, match=r"model.dtype=float16 is not supported on this worker's device "
                                              r"\(cpu\). Fix: model.dtype=bfloat16 or float32"):
            check_dtype_supported("float16")
