"""Dataset formats: detect them from column names and turn each row into a canonical record.

Three kinds of data, each with a canonical record made of chat messages ({"role", "content"}):

- sft:        {"messages": [...]}: every assistant turn is trained on.
- preference: {"prompt": [...], "chosen": [...], "rejected": [...]}: chosen/rejected continue the prompt.
- prompt:     {"prompt": [...], "answer": str}: for RL; `answer` feeds rule-based rewards ("" if none).

Accepted formats (column names come from `data.keys`, shown here with their defaults):

| format              | kind       | example row                                                          |
|---------------------|------------|----------------------------------------------------------------------|
| prompt_response     | sft        | {"prompt": "2+2?", "response": "4"}                                  |
| alpaca              | sft        | {"instruction": "Add.", "input": "2 + 2", "output": "4"}              |
| messages            | sft        | {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}    |
| pairwise            | preference | {"prompt": "2+2?", "chosen": "4", "rejected": "5"} (prompt optional; |
|                     |            |  chosen/rejected may also be message lists, or whole conversations   |
|                     |            |  that start with the user turn, as in UltraFeedback)                 |
| transcript_pairwise | preference | {"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": ...}  |
| ranking             | preference | {"prompt": "...", "responses": ["a", "b", "c"], "ranks": [1, 3, 2]}   |
|                     |            |  lower rank is better; expanded into every strictly ordered pair     |
| prompt              | prompt     | {"prompt": "2+2?", "answer": "4"} (prompt may be a message list)     |

This file is pure Python (no tokenizer): tokenize.py renders the records.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from rlhf_system.config import DataKeys
from rlhf_system.data.sources import DataError

KIND_FORMATS = {
    "sft": ("messages", "alpaca", "prompt_response"),
    "preference": ("ranking", "transcript_pairwise", "pairwise"),
    "prompt": ("prompt",),
}
ROLES = ("system", "user", "assistant", "tool")
_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def required_keys(fmt: str, keys: DataKeys) -> list[str]:
    return {
        "prompt_response": [keys.prompt, keys.response],
        "alpaca": [keys.instruction, keys.output],
        "messages": [keys.messages],
        "pairwise": [keys.chosen, keys.rejected],
        "transcript_pairwise": [keys.chosen, keys.rejected],
        "ranking": [keys.prompt, keys.responses, keys.ranks],
        "prompt": [keys.prompt],
    }[fmt]


def detect_format(columns: list[str], kind: str, keys: DataKeys, fmt: str, path: str,
                  first_row: dict | None = None) -> str:
    """Pick the format from the columns (or check the configured one). Errors list the keys found."""
    found = ", ".join(sorted(columns)) or "none"
    if fmt != "auto":
        if fmt not in KIND_FORMATS[kind]:
            raise DataError(f"{path}: data.format={fmt} is not a {kind} format; use one of "
                            f"{', '.join(KIND_FORMATS[kind])} or auto")
        missing = [k for k in required_keys(fmt, keys) if k not in columns]
        if missing:
            raise DataError(f"{path}: format '{fmt}' needs key(s) {missing} (see data.keys); found keys: {found}")
        return fmt
    for candidate in KIND_FORMATS[kind]:
        if all(k in columns for k in required_keys(candidate, keys)):
            if candidate == "transcript_pairwise" and not _looks_like_transcript(first_row, keys):
                continue
            if candidate == "pairwise" and _looks_like_transcript(first_row, keys) and keys.prompt not in columns:
                return "transcript_pairwise"
            return candidate
    wanted = "; ".join(f"{f}: {'+'.join(required_keys(f, keys))}" for f in KIND_FORMATS[kind])
    raise DataError(f"{path}: cannot detect a {kind} format: found keys: {found}; expected one of: {wanted} "
                    "(rename columns with data.keys.*)")


def _looks_like_transcript(row: dict | None, keys: DataKeys) -> bool:
    return bool(row) and isinstance(row.get(keys.chosen), str) and "\n\nAssistant:" in row[keys.chosen]


# -------------------------------------------------------------------------------- row -> record
def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: key '{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str, where: str, role_for_text: str) -> list[dict]:
    """A string becomes one message of `role_for_text`; a list is checked message by message."""
    if isinstance(value, str):
        return [{"role": role_for_text, "content": value}]
    if not isinstance(value, list):
        raise DataError(f"{where}: key '{key}' must be a string or a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}].role is '{m['role']}', expected one of {list(ROLES)}")
        out.append({"role": m["role"], "content": _text(m["content"], f"{key}[{i}].content", where)})
    return out


def _get(row: dict, key: str, where: str) -> Any:
    value = row.get(key)
    if value is None:
        present = sorted(k for k, v in row.items() if v is not None)
        raise DataError(f"{where}: missing key '{key}'; keys found: {present}")
    return value


def to_sft(row: dict, fmt: str, keys: DataKeys, where: str, system: str = "") -> dict:
    if fmt == "messages":
        msgs = _messages(_get(row, keys.messages, where), keys.messages, where, "user")
    elif fmt == "alpaca":
        prompt = _text(_get(row, keys.instruction, where), keys.instruction, where)
        extra = row.get(keys.input)
        if extra:
            prompt = f"{prompt}\n\n{_text(extra, keys.input, where)}"
        msgs = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(_get(row, keys.output, where), keys.output, where)}]
    else:
        msgs = _messages(_get(row, keys.prompt, where), keys.prompt, where, "user")
        msgs += _messages(_get(row, keys.response, where), keys.response, where, "assistant")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn to train on")
    return {"messages": _with_system(msgs, system)}


def _with_system(msgs: list[dict], system: str) -> list[dict]:
    if system and (not msgs or msgs[0]["role"] != "system"):
        return [{"role": "system", "content": system}] + msgs
    return msgs


def parse_transcript(text: str, where: str) -> list[dict]:
    """'\\n\\nHuman: q\\n\\nAssistant: a' -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: transcript must start with '\\n\\nHuman: ' and alternate with "
                        "'\\n\\nAssistant: ' turns")
    return [{"role": "user" if who == "Human" else "assistant", "content": body}
            for who, body in zip(parts[1::2], parts[2::2])]


def _split_common_prefix(a: list[dict], b: list[dict], where: str) -> tuple[list, list, list]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    # The continuations must start at an assistant turn: back up over a shared assistant turn.
    while n > 0 and (n == len(a) or n == len(b) or a[n]["role"] != "assistant"):
        n -= 1
    if n == 0 or a[n]["role"] != "assistant" or b[n]["role"] != "assistant":
        raise DataError(f"{where}: chosen and rejected share no prompt that ends before an assistant turn")
    return a[:n], a[n:], b[n:]


def to_preference(row: dict, fmt: str, keys: DataKeys, where: str, system: str = "") -> list[dict]:
    """One row -> one or more pairs (rankings expand into every strictly ordered pair)."""
    if fmt == "ranking":
        prompt = _messages(_get(row, keys.prompt, where), keys.prompt, where, "user")
        responses, ranks = _get(row, keys.responses, where), _get(row, keys.ranks, where)
        if not isinstance(responses, list) or not isinstance(ranks, list) or len(responses) != len(ranks):
            raise DataError(f"{where}: '{keys.responses}' and '{keys.ranks}' must be lists of equal length")
        if len(responses) < 2:
            raise DataError(f"{where}: a ranking needs at least 2 responses, got {len(responses)}")
        pairs = []
        for i, j in itertools.combinations(range(len(responses)), 2):
            if ranks[i] == ranks[j]:
                continue  # a tie carries no preference
            best, worst = (i, j) if ranks[i] < ranks[j] else (j, i)
            pairs.append({
                "prompt": _with_system(prompt, system),
                "chosen": _messages(responses[best], f"{keys.responses}[{best}]", where, "assistant"),
                "rejected": _messages(responses[worst], f"{keys.responses}[{worst}]", where, "assistant"),
            })
        return pairs
    chosen, rejected = _get(row, keys.chosen, where), _get(row, keys.rejected, where)
    if fmt == "transcript_pairwise":
        a = parse_transcript(_text(chosen, keys.chosen, where), f"{where} ({keys.chosen})")
        b = parse_transcript(_text(rejected, keys.rejected, where), f"{where} ({keys.rejected})")
        prompt, c, r = _split_common_prefix(a, b, where)
    elif isinstance(chosen, list) and chosen and isinstance(chosen[0], dict) and chosen[0].get("role") != "assistant":
        # Whole conversations (UltraFeedback, HH as messages): the shared turns are the prompt, and a
        # `prompt` column beside them repeats the user turn, so it is not prepended again.
        prompt, c, r = _split_common_prefix(_messages(chosen, keys.chosen, where, "assistant"),
                                            _messages(rejected, keys.rejected, where, "assistant"), where)
    elif row.get(keys.prompt) is not None:
        prompt = _messages(row[keys.prompt], keys.prompt, where, "user")
        c = _messages(chosen, keys.chosen, where, "assistant")
        r = _messages(rejected, keys.rejected, where, "assistant")
    else:  # bare texts: a reward model scores them whole
        prompt = []
        c = _messages(chosen, keys.chosen, where, "assistant")
        r = _messages(rejected, keys.rejected, where, "assistant")
    return [{"prompt": _with_system(prompt, system), "chosen": c, "rejected": r}]


def to_prompt(row: dict, fmt: str, keys: DataKeys, where: str, system: str = "") -> dict:
    prompt = _messages(_get(row, keys.prompt, where), keys.prompt, where, "user")
    if prompt and prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: an RL prompt must not end with an assistant turn")
    answer = row.get(keys.answer)
    return {"prompt": _with_system(prompt, system), "answer": "" if answer is None else str(answer)}
