"""Config tree: YAML loading, dotted overrides, and every user-facing error."""

from pathlib import Path

import pytest
import yaml

from rlhf_system.config import ConfigError, RunConfig, load_config, parse_override, validate
from rlhf_system.config_checks import roles_for

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
mode: sft
data:
  train: [{path: data/train.jsonl}]
train:
  global_batch_size: 8
  micro_batch_size: 2
"""


def test_yaml_and_overrides_apply(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=2e-5", "data.max_len=512", "data.packing=true",
                                              "peft.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.optim.lr == 2e-5
    assert cfg.data.max_len == 512 and cfg.data.packing is True
    assert cfg.peft.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.global_batch_size == 8
    assert cfg.data.train[0].path == "data/train.jsonl" and cfg.data.train[0].weight == 1.0


def test_override_creates_nested_section(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train: [{path: a.jsonl}]\n"), ["algorithm.dpo.beta=0.5"])
    assert cfg.algorithm.dpo.beta == 0.5


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE + "optim:\n  lrr: 1e-5\n"))
    msg = str(e.value)
    assert "unknown config key 'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg
    assert "c.yaml" in msg and "\n" not in msg


def test_unknown_override_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'data.max_lenn'.*did you mean 'data.max_len'"):
        load_config(write(tmp_path, BASE), ["data.max_lenn=5"])


def test_unknown_key_in_list_element(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train\[0\].wieght.*did you mean 'data.train\[0\].weight'"):
        load_config(write(tmp_path, "data:\n  train: [{path: a.jsonl, wieght: 2}]\n"))


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'.*did you mean 'optim'"):
        load_config(write(tmp_path, BASE + "optimizer: {lr: 1}\n"))


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1", "optim.l r=1", "optim.lr=[1, 2"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="bad override"):
        parse_override(bad)


def test_override_into_value_is_error(tmp_path):
    with pytest.raises(ConfigError, match="'lr' is a value, not a section"):
        load_config(write(tmp_path, BASE), ["optim.lr.x=1"])


def test_wrong_type_names_field_value_and_fix(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), ["optim.lr=fast"])
    msg = str(e.value)
    assert "optim.lr" in msg and "'fast'" in msg and "Fix:" in msg


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:3: invalid YAML"):
        load_config(write(tmp_path, "mode: sft\noptim:\n\tlr: 1\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_mode_mismatch(tmp_path):
    with pytest.raises(ConfigError, match="mode is 'sft' but the command is 'train dpo'"):
        load_config(write(tmp_path, BASE), mode="dpo")


def test_batch_arithmetic(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), ["train.global_batch_size=10", "placement.actor=2"])
    msg = str(e.value)
    assert "train.global_batch_size=10" in msg and "placement.actor=2" in msg and "= 4" in msg
    assert "e.g. train.global_batch_size=8" in msg or "e.g. train.global_batch_size=12" in msg


def test_batch_arithmetic_ok_with_accumulation(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.global_batch_size=16", "placement.actor=2"])
    assert cfg.train.global_batch_size // (cfg.placement.actor * cfg.train.micro_batch_size) == 4


PPO = """
mode: ppo
model: {reward_path: rm}
data: {train: [{path: prompts.jsonl}]}
train: {global_batch_size: 16, micro_batch_size: 2, rollout_batch_size: 8}
rollout: {n_samples_per_prompt: 2}
"""


def test_group_estimator_needs_two_samples(tmp_path):
    with pytest.raises(ConfigError, match="n_samples_per_prompt=1 but algorithm.estimator=grpo"):
        load_config(write(tmp_path, PPO), ["algorithm.estimator=grpo", "rollout.n_samples_per_prompt=1",
                                           "train.global_batch_size=8"])
    cfg = load_config(write(tmp_path, PPO), ["algorithm.estimator=rloo"])
    assert "critic" not in roles_for(cfg)
    assert "critic" in roles_for(load_config(write(tmp_path, PPO)))


def test_ppo_experience_divisibility(tmp_path):
    with pytest.raises(ConfigError, match="8 x rollout.n_samples_per_prompt=3 = 24 samples per step"):
        load_config(write(tmp_path, PPO), ["rollout.n_samples_per_prompt=3"])


def test_gpu_count_vs_placement(tmp_path):
    over = ["placement.gpus_per_node=4", "placement.actor=2", "placement.critic=2", "placement.reward=2",
            "placement.reference=2", "rollout.num_engines=2", "train.global_batch_size=16"]
    with pytest.raises(ConfigError, match=r"needs 10 GPUs .* = 4"):
        load_config(write(tmp_path, PPO), over)
    # Colocating actor+reference and critic+reward brings it to 2 + 2 + 2 = 6 > 4: still too many.
    with pytest.raises(ConfigError, match="needs 6 GPUs"):
        load_config(write(tmp_path, PPO), over + ["placement.colocate=[[actor,reference],[critic,reward]]"])
    cfg = load_config(write(tmp_path, PPO), over + ["placement.nodes=2",
                                                    "placement.colocate=[[actor,reference],[critic,reward]]"])
    assert cfg.placement.nodes == 2


def test_colocated_roles_need_equal_sizes(tmp_path):
    with pytest.raises(ConfigError, match="colocated roles need the same number of GPUs"):
        load_config(write(tmp_path, PPO), ["placement.actor=2", "placement.reference=1",
                                           "placement.colocate=[[actor,reference]]", "train.global_batch_size=8",
                                           "train.micro_batch_size=2"])


def test_validate_reports_every_problem_on_its_own_line():
    cfg = RunConfig(mode="sft")
    cfg.data.max_prompt_len = 600
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    lines = str(e.value).splitlines()
    assert any("data.train is empty" in line for line in lines)
    assert any("data.max_prompt_len=600" in line for line in lines)


def test_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=3e-4"])
    path = cfg.dump(tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 3e-4


def test_dtype_auto_is_float32_on_cpu():
    import torch

    want = "bfloat16" if torch.cuda.is_available() else "float32"
    assert RunConfig().model.resolved_dtype() == want


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path} must open with the command that runs it"
    if path.parent.name == "bench":  # a sweep file of `rlhf bench scale`: every point must validate
        from rlhf_system.bench.scale import expand, load_sweep

        assert expand(load_sweep(str(path)), [], str(path)), path
        return
    cfg = load_config(path)
    # configs/<mode>/..., except the critic-free estimators, which are PPO-mode runs in their own folders
    assert cfg.mode == path.parent.name or (cfg.mode == "ppo" and cfg.algorithm.estimator == path.parent.name)


def test_ppo_kl_combinations_that_would_do_nothing(tmp_path):
    with pytest.raises(ConfigError, match="Fix: algorithm.kl.in_reward=false"):
        load_config(write(tmp_path, PPO), ["algorithm.estimator=grpo"])
    with pytest.raises(ConfigError, match="k1's gradient is the score function"):
        load_config(write(tmp_path, PPO), ["algorithm.kl.in_reward=false"])
    cfg = load_config(write(tmp_path, PPO), ["algorithm.estimator=grpo", "algorithm.kl.in_reward=false",
                                              "algorithm.kl.estimator=k3"])
    assert cfg.algorithm.kl.estimator == "k3"


def test_ppo_rejects_quantised_actor(tmp_path):
    with pytest.raises(ConfigError, match="syncing a quantised actor into vLLM is not supported"):
        load_config(write(tmp_path, PPO), ["peft.quant.load_in=4bit", "peft.lora.enabled=true"])


def test_error_names_the_override_or_the_file_it_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.lrr' \(from the override 'optim.lrr=1'\): did you mean 'optim.lr'"):
        load_config("configs/sft/tiny-cpu.yaml", ["optim.lrr=1"], mode="sft")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: sft\noptim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=rf"'optim.lrr' \(from {bad}\)"):
        load_config(bad, ["optim.lr=1e-3"], mode="sft")


def test_flash_attention_2_needs_gpus_and_half_precision(tmp_path):
    """Packing with FA2 goes flat (data/collate.py); FA2 itself cannot run on CPU or in fp32."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), ["model.attn_implementation=flash_attention_2", "model.dtype=float32"])
    assert "needs CUDA GPUs, but placement.gpus_per_node=0" in str(e.value)
    assert "bfloat16 or float16 only, but model.dtype=float32" in str(e.value)
    cfg = load_config(write(tmp_path, BASE), ["model.attn_implementation=flash_attention_2", "model.dtype=bfloat16",
                                              "placement.gpus_per_node=8", "data.packing=true"])
    assert cfg.data.packing and cfg.model.attn_implementation == "flash_attention_2"


def test_streaming_needs_a_step_count(tmp_path):
    with pytest.raises(ConfigError, match="data.streaming=true .* Fix: set train.max_steps"):
        load_config(write(tmp_path, BASE), ["data.streaming=true"])
    assert load_config(write(tmp_path, BASE), ["data.streaming=true", "train.max_steps=5"]).data.streaming


def test_grpo_family_variant_checks(tmp_path):
    grpo = ["algorithm.estimator=grpo", "algorithm.kl.in_reward=false", "algorithm.kl.estimator=k3"]
    with pytest.raises(ConfigError, match="Fix: algorithm.loss_agg=seq_sum_norm"):
        load_config(write(tmp_path, PPO), [*grpo, "algorithm.estimator=dr_grpo"])
    with pytest.raises(ConfigError, match="only a group estimator ignores"):
        load_config(write(tmp_path, PPO), ["rollout.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="rewards.overlong_buffer=999"):
        load_config(write(tmp_path, PPO), ["rewards.overlong_buffer=999"])
    with pytest.raises(ConfigError, match=r"train.eval_pass_k=\[1, 8\]"):
        load_config(write(tmp_path, PPO), ["train.eval_pass_k=[1, 8]"])
    with pytest.raises(ConfigError, match="tis_cap=0.9 <= 1"):
        load_config(write(tmp_path, PPO), ["algorithm.is_mode=mask", "algorithm.tis_cap=0.9"])
    with pytest.raises(ConfigError, match="rollout.max_turns=3 but rollout.env is empty"):
        load_config(write(tmp_path, PPO), ["rollout.max_turns=3"])
    with pytest.raises(ConfigError, match="algorithm.policy_loss"):
        load_config(write(tmp_path, PPO), ["algorithm.policy_loss=ppo2"])
    cfg = load_config(write(tmp_path, PPO), [*grpo, "algorithm.estimator=dr_grpo", "algorithm.loss_agg=seq_sum_norm",
                                              "algorithm.policy_loss=gspo", "rollout.dynamic_sampling=true",
                                              "rewards.overlong_buffer=4", "algorithm.overlong_filter=true"])
    assert cfg.algorithm.estimator == "dr_grpo" and cfg.rollout.dynamic_sampling


def test_every_config_field_is_described():
    """`rlhf config --describe` prints these; a field without one is a setting nobody can find."""
    from pydantic import BaseModel

    def walk(model, prefix=""):
        for name, f in model.model_fields.items():
            sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
            if sub is not None:
                yield from walk(sub, f"{prefix}{name}.")
            elif not (f.description or "").strip():
                yield prefix + name

    assert list(walk(RunConfig)) == []


def test_describe_prints_each_setting_with_what_it_does(tmp_path, capsys):
    from rlhf_system.cli import main

    assert main(["config", "--config", str(write(tmp_path, PPO)), "algorithm.distill.coef=2", "--describe",
                 "algorithm.distill"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split(" = ")[0] for x in lines] == ["algorithm.distill." + k for k in (
        "coef", "discount", "reward_coef", "loss", "beta", "topk", "on_policy")]
    assert lines[0].startswith("algorithm.distill.coef = 2.0  # algorithm.estimator=opd: weight of")
    with pytest.raises(ConfigError, match="no setting starts with it"):
        from rlhf_system.config_files import describe

        describe(RunConfig(), "algorithm.nope")
