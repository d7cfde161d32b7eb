"""Fake checkpoints of real architectures: a model folder that looks like the real one to every check
that reads a folder without loading its weights (config.json, safetensors headers, the shard index).

The model is built from its published numbers on the meta device, so the parameter names, shapes and
dtypes are transformers' own; each shard is a valid safetensors file whose data section is a hole
(the header is written, then the file is truncated to its full size): an 8B checkpoint costs a few
kilobytes of disk. Reading a tensor's bytes gives zeros. No download, no hub.

    from tests.fake_checkpoints import write_fake_checkpoint
    path = write_fake_checkpoint(tmp_path / "llama3-8b", "llama3-8b")
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

# safetensors' dtype names (https://github.com/huggingface/safetensors: the format's header spec).
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def llama3_8b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=128000, eos_token_id=128001)


def qwen25_7b():
    from transformers import Qwen2Config

    # Qwen2 attention always has q/k/v biases (transformers hard-codes them for this architecture).
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=151643, eos_token_id=151645)


def llama2_13b_rm():
    from transformers import LlamaConfig

    # A Llama-2-13B backbone with a one-label score head: what the PPO reward role loads ("classifier").
    return LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, num_labels=1, pad_token_id=0)


# name -> (config factory, head): "causal_lm" or "seq_cls" (AutoModelForSequenceClassification).
ARCHITECTURES = {
    "llama3-8b": (llama3_8b, "causal_lm"),
    "qwen2.5-7b": (qwen25_7b, "causal_lm"),
    "llama2-13b-rm": (llama2_13b_rm, "seq_cls"),
}


def meta_model(arch: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The architecture's model with every parameter on the meta device (no memory, real names and shapes)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    make_config, head = ARCHITECTURES[arch]
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(make_config(), dtype=dtype)
    model.config.architectures = [type(model).__name__]  # from_config leaves it unset; save_pretrained sets it
    return model


def _shards(tensors: dict[str, torch.Tensor], n: int) -> list[list[str]]:
    """Names split in order into `n` shards of about equal bytes, as save_pretrained's max_shard_size does."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > total / n and len(shards) < n:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_sparse_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """A valid safetensors file for `tensors` (meta tensors: only dtype and shape are read) whose data
    section is a hole. Returns the bytes of data it declares."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no data block is written
    return offset


def write_fake_checkpoint(out: str | Path, arch: str, shards: int = 4) -> Path:
    """A model folder for `arch` (a key of ARCHITECTURES): config.json, `shards` sparse safetensors files
    and model.safetensors.index.json. No tokenizer: the checks it serves read none."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = meta_model(arch)
    model.config.save_pretrained(out)
    tensors = model.state_dict()
    groups = _shards(tensors, shards)
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_sparse_safetensors(out / fname, {n: tensors[n] for n in names})
        weight_map |= dict.fromkeys(names, fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
