"""Tiny-model kit: a byte-level BPE tokenizer and randomly initialised Llama-style models, saved locally.

Tests, CI and the laptop demo never reach a model hub. This kit trains a tokenizer on the synthetic
instruction corpus (tasks/synthetic.py), builds a causal LM and a sequence-classification twin (for
reward models and critics), and saves both with `save_pretrained` (safetensors), so they load back
through exactly the `from_pretrained` path a real checkpoint uses, in transformers and in vLLM.

Layout of `make_tiny_model(out)`:
    out/policy/   LlamaForCausalLM + tokenizer
    out/reward/   LlamaForSequenceClassification (num_labels=1) + tokenizer

head_dim is fixed at 64: the CPU attention kernels of vLLM reject smaller heads (CPU_STACK.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

IM_START, IM_END, PAD, BOS = "<|im_start|>", "<|im_end|>", "<|pad|>", "<|endoftext|>"

# ChatML. Written with expressions rather than template text so that Jinja whitespace control
# cannot eat the newlines; {% generation %} marks assistant content for transformers'
# return_assistant_tokens_mask (our own masking does not need it, see data/tokenize.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TinySpec:
    """Shape of the tiny model. The defaults give ~3.5M parameters: minutes of CPU training."""

    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4           # head_dim = hidden_size / num_heads must be 64 for vLLM on CPU
    num_kv_heads: int = 2
    intermediate_size: int = 704    # a multiple of 32: bitsandbytes packs 4-bit CPU weights in blocks of 32
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads != 64:
            raise ValueError(f"hidden_size/num_heads must be 64 (vLLM CPU kernels), got "
                             f"{self.hidden_size}/{self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")


def train_tokenizer(texts: list[str], vocab_size: int = 2048, split_digits: bool = False, fam=None):
    """Byte-level BPE trained on `texts`, wrapped as a PreTrainedTokenizerFast with a chat template.
    split_digits: one token per digit, as Llama's and Qwen's tokenizers do, so that copying a number
    (into a tool call, out of a tool result) is copying digit by digit, whatever the number. `fam`
    (models/families.Family): that family's special tokens and chat template instead of the kit's ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    pad, bos, eos, extra = (PAD, BOS, IM_END, (IM_START,)) if fam is None else (fam.pad, fam.bos, fam.eos, fam.specials)
    # The kit's own order (pad, bos, im_start, im_end) fixes its token ids, and with them the random
    # init the learning tests' figures were measured with: swapping two ids changed the tool SFT model's
    # held-out greedy accuracy from 0.79 to 0.22.
    specials = [PAD, BOS, IM_START, IM_END] if fam is None else list(dict.fromkeys([pad, bos, eos, *extra]))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[s for s in specials if s not in (pad, bos, eos)],
                                   model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE if fam is None else fam.template
    return fast


def build_models(tokenizer, spec: TinySpec, fam=None):
    """(causal LM, sequence classifier) with the same backbone shape, randomly initialised; `fam`
    (models/families.Family): that family's architecture instead of Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    vocab = -(-len(tokenizer) // 64) * 64  # round up: friendlier matmul shapes
    if fam is not None:
        return _family_models(tokenizer, spec, fam, vocab)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=64, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    policy = LlamaForCausalLM(config)
    cls_fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    cls_config = LlamaConfig(**{**cls_fields, "num_labels": 1, "tie_word_embeddings": False})
    torch.manual_seed(spec.seed + 1)
    reward = LlamaForSequenceClassification(cls_config)
    return policy, reward


def _family_models(tokenizer, spec: TinySpec, fam, vocab: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_system.models.families import model_config

    shape = (vocab, spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.intermediate_size,
             spec.max_position_embeddings)
    torch.manual_seed(spec.seed)
    policy = AutoModelForCausalLM.from_config(model_config(fam, tokenizer, *shape), torch_dtype=torch.float32)
    cls_config = model_config(fam, tokenizer, *shape, tie=False)
    cls_config.num_labels = 1
    torch.manual_seed(spec.seed + 1)
    reward = AutoModelForSequenceClassification.from_config(cls_config, torch_dtype=torch.float32)
    return policy, reward


def make_tiny_model(out: str | Path, spec: TinySpec | None = None, corpus: list[str] | None = None,
                    seed: int = 0, split_digits: bool = False, family: str = "tiny") -> dict[str, Path]:
    """Train the tokenizer, build both models and save them under `out`. Returns their folders.
    `family`: tiny (the kit's Llama with ChatML) or one of models/families.FAMILIES."""
    from rlhf_system.models.families import family as family_of
    from rlhf_system.tasks.files import corpus_texts

    fam = None if family == "tiny" else family_of(family)
    spec = spec or TinySpec(seed=seed)
    out = Path(out)
    texts = corpus if corpus is not None else corpus_texts(seed=seed)
    # The role names appear in every chat-templated sample: give them tokens of their own.
    texts = list(texts) + ["system\n", "user\n", "assistant\n"] * 200
    tokenizer = train_tokenizer(texts, spec.vocab_size, split_digits, fam)
    policy, reward = build_models(tokenizer, spec, fam)
    paths = {"policy": out / "policy", "reward": out / "reward"}
    for name, model in (("policy", policy), ("reward", reward)):
        model.save_pretrained(paths[name], safe_serialization=True)
        tokenizer.save_pretrained(paths[name])
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec) | {"family": family}, indent=2))
    return paths
