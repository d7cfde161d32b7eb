"""Shared fixtures. Tests never reach the network: models and tokenizers are built here by models/tiny."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
# DeepSpeed JIT ops cached per venv (a cache shared between venvs rebuilds on every switch).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import pytest

CORPUS = [
    "Add the two numbers.", "7 + 5", "12", "Reverse the word.", "cat", "tac", "hello world",
    "I'm sorry, but I can't help with that.", "List the words as bullets.", "- red\n- blue",
] * 40


@pytest.fixture(scope="session")
def char_tokenizer():
    """Byte-level BPE with no merges: one token per character, so masks can be written by hand."""
    from rlhf_system.models.tiny import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=260)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from rlhf_system.models.tiny import train_tokenizer

    return train_tokenizer(CORPUS + ["user\n", "assistant\n", "system\n"] * 50, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_policy(bpe_tokenizer):
    """A 2-layer randomly initialised Llama matching bpe_tokenizer (not saved)."""
    from rlhf_system.models.tiny import TinySpec, build_models

    spec = TinySpec(hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2, intermediate_size=256)
    policy, _ = build_models(bpe_tokenizer, spec)
    return policy.eval()
