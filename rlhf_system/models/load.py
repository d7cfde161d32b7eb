"""Loading Hugging Face models and tokenizers for a role, with clear errors before anything starts.

Only local folders are loaded in tests and CI (HF_HUB_OFFLINE=1); a hub id works on machines that
allow it. LoRA / 4-bit / 8-bit loading come with the PEFT work (issue 3) and will live here too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_system.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(path: str, field: str) -> str:
    """A local folder must hold a config.json; anything else that is not a hub id is an error."""
    p = Path(path)
    looks_local = path.startswith((".", "/", "~")) or p.exists() or path.count("/") != 1
    if not path or (looks_local and not (p / "config.json").exists()):
        raise ConfigError(f"{field}: '{path}' is not a model folder (no config.json). "
                          "Fix: point it at a saved model (rlhf make-tiny-model OUT makes one)")
    return path


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = check_model_path(cfg.tokenizer_path or cfg.path, "model.tokenizer_path" if cfg.tokenizer_path else "model.path")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # many base tokenizers ship without one
    return tok


def load_causal_lm(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoModelForCausalLM

    path = check_model_path(path or cfg.path, "model.path")
    kwargs = {"dtype": DTYPES[cfg.resolved_dtype()], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model
