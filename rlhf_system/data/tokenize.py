"""Rendering chat messages into token ids with an assistant-only loss mask, and truncation.

The mask is computed from character spans, which works with any chat template: for each trained
assistant turn i, the turn starts where `messages[:i]` rendered with the generation prompt ends, and
stops where `messages[:i+1]` rendered ends, less trailing whitespace (the end-of-turn token is trained, so the model learns to
stop). Tokens whose first character falls inside a span are trained. This needs templates whose
rendering of a conversation's prefix is a prefix of the whole rendering; a template that is not
(some rewrite earlier turns) is reported as an error for that sample rather than silently
mis-masked. Template `plain` renders user text + newline and assistant text + eos, for base
models without a chat template.
"""

from __future__ import annotations

import hashlib

from rlhf_system.data.sources import DataError

PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
)


def check_template(tokenizer, template: str, where: str) -> None:
    """Fail before any tokenisation when `data.template=chat` meets a tokenizer without one."""
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the tokenizer has no chat template but data.template=chat. "
                        "Fix: data.template=plain, or use a tokenizer with a chat_template")
    if template == "plain" and tokenizer.eos_token is None:
        raise DataError(f"{where}: data.template=plain needs a tokenizer with an eos_token")


def _render(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool, tools=None) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt,
        chat_template=PLAIN_TEMPLATE if template == "plain" else None, **({"tools": tools} if tools else {}))


def render_prompt(tokenizer, messages: list[dict], template: str, tools=None) -> str:
    """The text a policy continues: the prompt plus the template's generation prompt; `tools` (OpenAI
    function schemas) go to templates that render them."""
    return _render(tokenizer, messages, template, add_generation_prompt=True, tools=tools)


def render_conversation(tokenizer, messages: list[dict], template: str) -> str:
    """A whole conversation (ending in an assistant turn) as the model was trained on it."""
    return _render(tokenizer, messages, template, add_generation_prompt=False)


def encode_with_mask(tokenizer, messages: list[dict], template: str, train_from: int,
                     where: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask over assistant turns at index >= train_from."""
    full = _render(tokenizer, messages, template, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        head = _render(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], template, add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(head)):
            raise DataError(f"{where}: the chat template does not render turn {i} as a prefix of the whole "
                            "conversation, so assistant tokens cannot be located. Fix: use a prefix-stable "
                            "template (data.template or the tokenizer's chat_template)")
        # Trailing whitespace after the end-of-turn token (ChatML's "\n") is template glue, not
        # something the model must produce: generation stops at the end-of-turn token.
        spans.append((len(head), len(upto.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    if spans and not any(mask):
        raise DataError(f"{where}: the chat template yields an all-zero loss mask (no assistant token is "
                        "trained). Fix: check the template renders assistant content, or data.template=plain")
    return ids, mask


def truncate(ids: list[int], mask: list[int], max_len: int, policy: str) -> tuple[list[int], list[int]] | None:
    """Fit a sample into max_len. None means drop it (policy drop, or nothing trainable left).

    left: cut prompt tokens from the start (keeps the response, the part that carries the loss);
    a response longer than max_len alone is then cut at its end. right: cut the end.
    """
    if len(ids) <= max_len:
        return ids, mask
    trainable = 1 in mask
    if policy == "drop":
        return None
    if policy == "left":
        first = mask.index(1) if 1 in mask else len(ids)
        cut = min(len(ids) - max_len, first)
        ids, mask = ids[cut:], mask[cut:]
    ids, mask = ids[:max_len], mask[:max_len]
    if trainable and 1 not in mask:  # the cut removed every trained token
        return None
    return ids, mask


def tokenizer_fingerprint(tokenizer, template: str) -> str:
    """Identity of a tokenizer + template, for the tokenisation cache key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    chat = PLAIN_TEMPLATE if template == "plain" else (tokenizer.chat_template or "")
    return hashlib.sha256((body + "\0" + chat + "\0" + str(tokenizer.eos_token)).encode()).hexdigest()[:16]


# A conversation the environment's messages are rendered after: what matters is only that it ends with
# a finished assistant turn, as the policy's turn before an observation does.
_BEFORE_OBSERVATION = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def render_observation(tokenizer, messages: list[dict], template: str, where: str) -> str:
    """The text between the end of an assistant turn (its end-of-turn token, where the engine stopped)
    and the start of the next assistant turn: the environment's `messages` with the template's glue and
    the generation prompt. Tokenised alone and appended to the engine's own tokens, so the policy's
    tokens are never re-tokenised. Needs a template whose rendering of a prefix is a prefix of the whole
    (as encode_with_mask does); else a DataError naming `where`."""
    before = _render(tokenizer, _BEFORE_OBSERVATION, template, add_generation_prompt=False).rstrip()
    full = _render(tokenizer, _BEFORE_OBSERVATION + messages, template, add_generation_prompt=True)
    if not full.startswith(before):
        raise DataError(f"{where}: the chat template does not render a conversation's prefix as a prefix of the "
                        "whole, so an observation cannot be appended token for token. Fix: a prefix-stable "
                        "template (data.template or the tokenizer's chat_template)")
    return full[len(before):]


def check_tool_template(tokenizer, template: str, model: str) -> None:
    """Fail unless the chat template renders a tool-role message (its content reaches the text) after an
    assistant turn, prefix-stably: what a tool environment's observations need."""
    from rlhf_system.config import ConfigError

    probe = "tool-result-7f3a"
    try:
        text = render_observation(tokenizer, [{"role": "tool", "content": probe}], template, f"model {model}")
    except Exception as e:  # templates that allow only user/assistant raise their own exceptions
        raise ConfigError(f"model {model}: its chat template cannot render a tool message ({type(e).__name__}: "
                          f"{str(e)[:120]}). Fix: a model whose chat template supports tools, or data.template=plain") from None
    if probe not in text:
        raise ConfigError(f"model {model}: its chat template drops tool-role messages, so tool results would never "
                          "reach the policy. Fix: a model whose chat template supports tools (role 'tool')")
