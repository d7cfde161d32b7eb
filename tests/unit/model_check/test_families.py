"""The model families (models/families.py) as tiny models, and `rlhf check-model` without an engine
(model_check/): each family's architecture and chat template load through
from_pretrained, the assistant-only masks train exactly the assistant turns, and one SFT and one RM step
improve their losses. The families' own quirks are reported as the real templates would make them:
Qwen3's dropped reasoning, Gemma's and Phi-3's missing tool turns, Phi-3's fused projections. The
engine checks (vLLM load, parity, GRPO step, weight sync) are in tests/integration/test_families.py."""

import json

import pytest

from rlhf_system.model_check.report import check_model
from rlhf_system.models.families import FAMILIES, family
from rlhf_system.models.tiny import TinySpec, make_tiny_model

SPEC = TinySpec(vocab_size=384, hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2, intermediate_size=256)
CORPUS = ["What is 12 + 30? The answer is 42. And 7 times 6? 42 as well. You are a careful assistant."] * 20
TOOLS = {"llama3": True, "qwen2.5": True, "qwen3": True, "mistral": True, "qwen2_moe": True,
         "gemma2": False, "gemma3": False, "phi3": False}
ARCH = {"llama3": "LlamaForCausalLM", "qwen2.5": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "mistral": "MistralForCausalLM",
        "phi3": "Phi3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


@pytest.fixture(scope="module")
def tiny_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_tiny_model(root / name, SPEC, corpus=CORPUS, family=name)["policy"] for name in FAMILIES}


def test_every_family_is_covered_here():
    assert set(FAMILIES) == set(TOOLS) == set(ARCH)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_checks_without_an_engine(tiny_families, name):
    report = check_model(str(tiny_families[name]), vllm=False)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"], report
    assert checks["load"]["detail"].startswith(ARCH[name])
    eos = family(name).eos
    assert checks["masks"]["detail"] == f"trains 2 assistant turns: '12 + 30 = 42.{eos}7 x 6 = 42 as well.{eos}'"
    assert checks["tools"]["ok"] == TOOLS[name], checks["tools"]
    # Qwen3's template drops earlier reasoning, so a multi-turn conversation with it cannot be masked
    assert checks["reasoning"]["ok"] == (name != "qwen3"), checks["reasoning"]
    assert ("the defaults miss" in checks["lora"]["detail"]) == (name == "phi3"), checks["lora"]
    for step in ("sft", "rm"):
        before, after = checks[step]["loss"]
        assert after < before, checks[step]
    assert {"vllm", "parity", "grpo", "sync"}.isdisjoint(checks)


def test_gemma_folds_the_system_prompt_and_calls_the_assistant_model(tiny_families):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_families["gemma2"])
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n"


def test_a_broken_template_fails_the_check(tiny_families, tmp_path):
    """A tokenizer whose eos is not the end-of-turn token would never stop generating: a failed check."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "broken"
    shutil.copytree(tiny_families["llama3"], path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.eos_token = "<|end_of_text|>"  # Llama-3 base's eos: the chat template ends turns with <|eot_id|>
    tok.save_pretrained(path)
    report = check_model(str(path), vllm=False)
    checks = {c["name"]: c for c in report["checks"]}
    assert not report["ok"] and not checks["template"]["ok"]
    assert "not the eos token '<|end_of_text|>'" in checks["template"]["detail"]


def test_unknown_family_is_one_line():
    with pytest.raises(ValueError, match="unknown model family 'llama9'; known: tiny"):
        family("llama9")


def test_no_rm_skips_the_classifier_copy(tiny_families, capsys):
    """`--no-rm`: the RM step (a second copy of the weights) is left out; the other checks still run."""
    from rlhf_system.cli import main

    assert main(["check-model", str(tiny_families["qwen3"]), "--no-vllm", "--no-rm"]) == 0
    names = [c["name"] for c in json.loads(capsys.readouterr().out)["checks"]]
    assert "rm" not in names and "sft" in names and "lora" in names, names
