"""The tiny-model kit end to end: build, load through from_pretrained, generate with HF and with vLLM (CPU)."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from rlhf_system.models.tiny import TinySpec, make_tiny_model

    out = tmp_path_factory.mktemp("tiny")
    spec = TinySpec(vocab_size=1024, hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2,
                    intermediate_size=256)
    return make_tiny_model(out, spec)


PROMPTS = ["Add the two numbers.\n\n7 + 5", "Reverse the word.\n\ncat", "What color is the sky on a clear day?"]


def test_loads_through_from_pretrained(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir["policy"])
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir["policy"])
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_dir["reward"])
    assert policy.config.head_dim == 64 and reward.config.num_labels == 1
    assert (tiny_dir["policy"] / "model.safetensors").exists()
    ids = tok("7 + 5 = 12", return_tensors="pt")
    with torch.no_grad():
        assert policy(**ids).logits.shape[-1] == policy.config.vocab_size
        assert reward(**ids).logits.shape == (1, 1)
    # The tokenizer was trained on the synthetic corpus: common words are single tokens.
    assert len(tok("assistant")["input_ids"]) == 1


def test_vllm_greedy_matches_hf_greedy(tiny_dir):
    """vLLM's CPU build generates from the saved folder, token for token what transformers generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_system.models.generate import chat_prompts, hf_generate, make_vllm, shutdown_vllm, vllm_generate

    tok = AutoTokenizer.from_pretrained(tiny_dir["policy"])
    prompt_ids = chat_prompts(tok, PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir["policy"]).eval()
    hf = hf_generate(model, tok, prompt_ids, max_new_tokens=12)
    llm = make_vllm(str(tiny_dir["policy"]), max_model_len=256)
    try:
        vl = [o[0] for o in vllm_generate(llm, prompt_ids, max_new_tokens=12)]
    finally:
        shutdown_vllm(llm)
    assert all(len(o) > 0 for o in vl)
    assert vl == hf


def test_cli_make_tiny_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlhf_system.cli", "make-tiny-model", str(tmp_path / "m"),
                          "--hidden-size", "128", "--layers", "1", "--vocab-size", "512"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "policy" / "config.json").exists()
    cfg = json.loads((tmp_path / "m" / "policy" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == 128
