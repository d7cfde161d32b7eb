"""The `rlhf` command: user errors are one line on stderr, exit status 2, before any heavy work."""

import json

import pytest
import yaml

from rlhf_system.cli import main


@pytest.fixture()
def sft_config(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1", "response": str(i + 1)}) + "\n" for i in range(20)))
    cfg = {"mode": "sft", "run_dir": str(tmp_path / "run"), "data": {"train": [{"path": str(data)}]},
           "model": {"path": str(tmp_path / "model")}, "train": {"global_batch_size": 8, "micro_batch_size": 4}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("overrides,needle", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train.global_batch_size=10"], "train.global_batch_size=10 is not divisible"),
    (["optim.lr"], "bad override 'optim.lr'"),
    ([], "model.tokenizer_path / model.path"),  # the model folder does not exist
])
def test_errors_are_one_line_exit_2(sft_config, capsys, overrides, needle):
    rc = main(["prepare-data", "sft", "--config", str(sft_config), *overrides])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_bad_data_is_reported_before_tokenising(sft_config, tmp_path, capsys, char_tokenizer):
    char_tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    rc = main(["prepare-data", "sft", "--config", str(sft_config)])
    err = capsys.readouterr().err
    assert rc == 2 and "sft.jsonl:2: malformed JSON line" in err


def test_prepare_data_writes_resolved_config(sft_config, tmp_path, capsys, char_tokenizer):
    char_tokenizer.save_pretrained(tmp_path / "model")
    rc = main(["prepare-data", "sft", "--config", str(sft_config), "data.packing=true", "data.max_len=64",
               "data.max_prompt_len=32"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["rows_in"] == {str(tmp_path / "sft.jsonl"): 20}
    assert report["train"]["max_len"] <= 64
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["data"]["packing"] is True and resolved["optim"]["lr"] == 1e-5


def test_config_command_prints_overrides(sft_config, capsys):
    assert main(["config", "--config", str(sft_config), "optim.lr=3e-4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["lr"] == 3e-4


def test_unknown_flag_is_rejected(sft_config):
    with pytest.raises(SystemExit) as e:
        main(["config", "--config", str(sft_config), "--bogus"])
    assert e.value.code == 2


def test_train_without_chat_template_fails_before_workers(sft_config, tmp_path, capsys, char_tokenizer):
    char_tokenizer.save_pretrained(tmp_path / "model")
    cfg_file = tmp_path / "model" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / "model" / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")  # a model folder; never loaded: the error comes first
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    rc = main(["train", "sft", "--config", str(sft_config)])
    err = capsys.readouterr().err
    assert rc == 2 and "the tokenizer has no chat template but data.template=chat" in err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


@pytest.mark.parametrize("rule, needle", [
    ("nope", "unknown reward rule 'nope'"),
    ("/no/such/rewards.py:score", "/no/such/rewards.py"),
])
def test_reward_errors_are_one_line_before_workers(tmp_path, capsys, rule, needle):
    """An unknown reward rule or a missing reward file: one line, exit 2, from `prepare` (no Ray started)."""
    from rlhf_system.models.tiny import TinySpec, make_tiny_model

    model = make_tiny_model(tmp_path / "m", TinySpec(hidden_size=64, num_heads=1, num_kv_heads=1, num_layers=1,
                                                     intermediate_size=64))["policy"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i} + 1", "answer": str(i + 1)}) + "\n" for i in range(8)))
    capsys.readouterr()  # the model kit's own output
    rc = main(["train", "ppo", "--config", "configs/grpo/tiny-cpu.yaml", f"model.path={model}",
               f"run_dir={tmp_path / 'run'}", f"data.train=[{{path: {prompts}}}]", "data.eval=[]",
               f"rewards.rules=[{rule}]"])
    err = capsys.readouterr().err  # tokenising the prompts shows progress bars first; then one error line
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and needle in last and "Traceback" not in err, err
    import ray

    assert not ray.is_initialized()
