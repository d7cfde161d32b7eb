"""The model families users bring, as tiny random models: each family's transformers config class, its
special tokens and a chat template that renders the way the family's own does (tool turns included
where the family has them, the family's quirks too), for `make_tiny_model(out, family=NAME)`.

    rlhf make-tiny-model /tmp/qwen3 --family qwen3     # then: rlhf check-model /tmp/qwen3/policy

What each template reproduces (and what our assistant-mask and observation code must cope with):
- llama3: header tokens, <|eot_id|> ends a turn; tool results are the `ipython` role.
- qwen2.5: ChatML; tools listed in the system turn, calls in <tool_call>, results as <tool_response> in a
  user turn.
- qwen3: as qwen2.5, and earlier assistant turns lose their <think> block (not prefix-stable for
  multi-turn reasoning: check-model says so); enable_thinking=false adds an empty think block.
- gemma2 / gemma3: <start_of_turn> / <end_of_turn>, the assistant is `model`, the system prompt is folded
  into the first user turn, roles must alternate (a tool turn raises, as Gemma's template does).
- mistral: [INST] ... [/INST], a [SYSTEM_PROMPT] block, </s> ends the answer, [TOOL_RESULTS].
- phi3: <|user|> ... <|end|>; tool-role messages are silently dropped, as Phi-3's template does.
- qwen2_moe (the MoE): Qwen2-MoE's sparse blocks (4 experts, 2 per token, a shared expert), ChatML.

Shapes: head_dim 64 (vLLM's CPU attention kernels), two layers; each family's own options (Gemma's
soft-capping and sliding window, Phi-3's fused projections, Qwen's biases and q/k norms) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_TOOLS_IN_SYSTEM = (
    "{% if tools %}{% set ns.sys = ns.sys + '\\n\\n# Tools\\n\\nYou may call functions. Signatures:\\n<tools>' %}"
    "{% for t in tools %}{% set ns.sys = ns.sys + '\\n' + (t | tojson) %}{% endfor %}"
    "{% set ns.sys = ns.sys + '\\n</tools>\\nReturn each call as <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>.' %}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] %}{% endif %}"
    + _TOOLS_IN_SYSTEM +
    "{% if ns.sys %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.sys + '<|eot_id|>' }}{% endif %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{% set role = 'ipython' if m['role'] == 'tool' else m['role'] %}"
    "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _chatml(strip_think: bool) -> str:
    # Qwen3's template drops the reasoning of assistant turns before the last user turn.
    last_user = ("{% set ns.last = -1 %}{% for m in messages %}{% if m['role'] == 'user' %}"
                 "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}") if strip_think else ""
    content = ("{% set c = m['content'] %}{% if loop.index0 < ns.last and '</think>' in c %}"
               "{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}") if strip_think else \
        "{% set c = m['content'] %}"
    gen = ("{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
           "{% endif %}") if strip_think else ""
    return (
        "{% set ns = namespace(sys='', last=-1) %}"
        "{% if messages and messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] %}{% endif %}"
        + _TOOLS_IN_SYSTEM + last_user +
        "{% if ns.sys %}{{ '<|im_start|>system\\n' + ns.sys + '<|im_end|>\\n' }}{% endif %}"
        "{% for m in messages %}" + content +
        "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}{{ c + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\\n' }}"
        "{% elif m['role'] == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + c + '\\n</tool_response><|im_end|>\\n' }}"
        "{% elif m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}" + gen + "{% endif %}"
    )


GEMMA = (
    "{{ bos_token }}{% set ns = namespace(first='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set ns.first = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (ns.first if loop.first else '') }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<end_of_turn>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<end_of_turn>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

MISTRAL = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + m['content'] + '[/SYSTEM_PROMPT]' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST]' + m['content'] + '[/INST]' }}"
    "{% elif m['role'] == 'tool' %}{{ '[TOOL_RESULTS]' + m['content'] + '[/TOOL_RESULTS]' }}"
    "{% else %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
)

PHI3 = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}{% generation %}{{ m['content'] + '<|end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% elif m['role'] in ['system', 'user'] %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    config: str                  # the transformers config class
    template: str
    bos: str
    eos: str                     # the end-of-turn token: where generation stops
    pad: str
    specials: tuple[str, ...]    # further special tokens of the template
    tools: bool                  # whether its template renders tool results
    options: dict = field(default_factory=dict)  # config fields of the family beyond the common shape


CHATML = ("<|im_start|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")

FAMILIES = {f.name: f for f in [
    Family("llama3", "LlamaConfig", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
           ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"), True,
           {"rope_theta": 500000.0, "tie_word_embeddings": False}),
    Family("qwen2.5", "Qwen2Config", _chatml(False), "<|endoftext|>", "<|im_end|>", "<|endoftext|>", CHATML, True,
           {"rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False}),
    Family("qwen3", "Qwen3Config", _chatml(True), "<|endoftext|>", "<|im_end|>", "<|endoftext|>", CHATML, True,
           {"rope_theta": 1000000.0, "tie_word_embeddings": True}),
    Family("gemma2", "Gemma2Config", GEMMA, "<bos>", "<end_of_turn>", "<pad>", ("<start_of_turn>", "<eos>"), False,
           {"query_pre_attn_scalar": 64, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "sliding_window": 512, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}),
    Family("gemma3", "Gemma3TextConfig", GEMMA, "<bos>", "<end_of_turn>", "<pad>", ("<start_of_turn>", "<eos>"), False,
           {"query_pre_attn_scalar": 64, "sliding_window": 512, "rope_local_base_freq": 10000.0,
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}),
    Family("mistral", "MistralConfig", MISTRAL, "<s>", "</s>", "<pad>",
           ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), True,
           {"sliding_window": None, "tie_word_embeddings": False}),
    Family("phi3", "Phi3Config", PHI3, "<s>", "<|end|>", "<|endoftext|>",
           ("<|system|>", "<|user|>", "<|assistant|>"), False, {"tie_word_embeddings": False}),
    Family("qwen2_moe", "Qwen2MoeConfig", _chatml(False), "<|endoftext|>", "<|im_end|>", "<|endoftext|>", CHATML, True,
           {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 256, "decoder_sparse_step": 1, "tie_word_embeddings": False,
            "use_sliding_window": False}),
]}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: tiny (the kit's own), {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model_config(fam: Family, tokenizer, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                 intermediate: int, max_positions: int, tie: bool | None = None):
    """The family's config at the tiny shape."""
    import transformers

    cls = getattr(transformers, fam.config)
    options = dict(fam.options)
    if tie is not None:
        options["tie_word_embeddings"] = tie
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
               max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
               **options)
