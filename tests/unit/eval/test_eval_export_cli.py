"""`rlhf eval` and `rlhf export` user errors: one line on stderr, exit status 2, before any weight loads
(the folders here hold only a config.json, so reaching a model load would fail differently)."""

import json

import pytest

from rlhf_system.cli import main

ROW = {"prompt": "Add the two numbers.\n\n3 + 4", "answer": "7", "family": "arithmetic", "task": "add",
       "check": "exact", "flagged": False}


@pytest.fixture()
def setup(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n")
    return tmp_path, str(model), str(prompts)


def run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("case,needle", [
    ("no_config", "is not a model folder (no config.json)"),
    ("missing_prompts", "missing.jsonl not found"),
    ("bad_line", "p.jsonl:2: malformed JSON line"),
    ("no_prompt_key", "p.jsonl:1: no \"prompt\""),
    ("unknown_rule", "unknown reward rule 'nope'"),
    ("rule_needs_fields", "--rules synthetic: prompt row 1: reward rule 'synthetic': meta is missing key 'task'"),
    ("compare_without_quant", "--compare-full-precision compares a quantised evaluation"),
    ("names", "--names: 1 names"),
    ("rm_not_classifier", "not a sequence classifier"),
    ("rm_quant_without_rm", "--rm-quant 4bit without --reward-model"),
])
def test_eval_errors_are_one_line(setup, capsys, case, needle):
    tmp, model, prompts = setup
    argv = ["eval", model, "--prompts", prompts]
    if case == "no_config":
        argv[1] = str(tmp)
    elif case == "missing_prompts":
        argv[3] = str(tmp / "missing.jsonl")
    elif case == "bad_line":
        (tmp / "p.jsonl").write_text(json.dumps(ROW) + "\n{\"prompt\": \n")
    elif case == "no_prompt_key":
        (tmp / "p.jsonl").write_text(json.dumps({"question": "hi"}) + "\n")
    elif case == "unknown_rule":
        argv += ["--rules", "synthetic,nope"]
    elif case == "rule_needs_fields":
        (tmp / "p.jsonl").write_text(json.dumps({"prompt": "hi", "answer": "x"}) + "\n")
    elif case == "compare_without_quant":
        argv += ["--compare-full-precision"]
    elif case == "names":
        argv = ["eval", model, model, "--prompts", prompts, "--names", "a"]
    elif case == "rm_not_classifier":
        argv += ["--reward-model", model]
    elif case == "rm_quant_without_rm":
        argv += ["--rm-quant", "4bit"]
    rc, err = run(capsys, argv)
    assert rc == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_export_errors_are_one_line(setup, capsys):
    tmp, model, _ = setup
    empty = tmp / "empty"
    empty.mkdir()
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp / "gone"),
                                                             "task_type": "CAUSAL_LM"}))
    bad_base = tmp / "bad_base"
    bad_base.mkdir()
    (bad_base / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": model}))
    (bad_base / "rlhf_base.json").write_text(json.dumps({"dtype": "float32", "quant": {"load_in": "3bit"}}))
    busy = tmp / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    cases = [
        (["export", str(tmp / "nothing"), "--out", str(tmp / "o1")], "does not exist"),
        (["export", str(empty), "--out", str(tmp / "o2")], "holds no adapter_config.json"),
        (["export", str(adapter), "--out", str(tmp / "o3")], f"base model '{tmp / 'gone'}' (base_model_name_or_path"),
        (["export", str(adapter), "--out", str(tmp / "o4"), "--base", str(empty)], "(--base) not found"),
        (["export", model, "--out", str(busy)], "exists and is not empty"),
        (["export", model, "--out", str(tmp / "o5"), "--base", model], "--base and --base-quant apply to adapters only"),
        (["export", model, "--out", str(tmp / "o6"), "--base-quant", "4bit"], "apply to adapters only"),
        (["export", str(bad_base), "--out", str(tmp / "o7")], f"{bad_base / 'rlhf_base.json'}: peft.quant.load_in: "),
    ]
    for argv, needle in cases:
        rc, err = run(capsys, argv)
        assert rc == 2 and needle in err and err.count("\n") == 1, (argv, err)
    assert not any(p.name.startswith(("o", ".o")) for p in tmp.iterdir())  # nothing half-written
