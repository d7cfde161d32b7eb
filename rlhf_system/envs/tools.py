"""Tools a policy can call, and the tool-call format it calls them in.

A call is JSON between markers, in the Hermes / Qwen2.5 layout that chat templates with tool support
render (and that open models are trained to emit):

    <tool_call>{"name": "calculator", "arguments": {"expression": "48213 * 79132"}}</tool_call>

`parse_calls(text)` finds every such block; a block that is not JSON, names no known tool or lacks an
argument gives a `CallError` whose message becomes the tool's reply to the model ("error: ..."), so a
malformed call is a failed step the policy can learn from, not a crash. The result goes back as a
tool-role message.

Tools: `calculator` (arithmetic on integers and decimals: + - * / // % ** and parentheses, evaluated
from the syntax tree, never with eval) and `python` (a script run by envs/sandbox.py, its printed output
as the result).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class CallError(ValueError):
    """A malformed call or a tool failure: its message is what the model reads back."""


@dataclass
class Call:
    name: str
    arguments: dict


def format_call(name: str, **arguments) -> str:
    """A call as the model writes it (demonstrations are built with this)."""
    return OPEN + json.dumps({"name": name, "arguments": arguments}) + CLOSE


def parse_calls(text: str, tools: dict) -> list[Call | CallError]:
    """Every call block of `text`, parsed; one CallError per malformed block. An opening marker that is
    never closed counts as a malformed call."""
    out: list[Call | CallError] = []
    for body in _CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            out.append(CallError(f"the tool call is not valid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            out.append(CallError('a tool call needs {"name": ..., "arguments": {...}}'))
            continue
        if obj["name"] not in tools:
            out.append(CallError(f"unknown tool {obj['name']!r}; tools: {', '.join(sorted(tools))}"))
            continue
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            out.append(CallError(f"the arguments of {obj['name']!r} must be an object"))
            continue
        out.append(Call(obj["name"], args))
    if text.count(OPEN) > text.count(CLOSE):
        out.append(CallError(f"a tool call opened with {OPEN} is never closed with {CLOSE}"))
    return out


# ---------------------------------------------------------------------------------------- calculator
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_DIGITS = 100  # results and powers beyond this are refused: a tool call must not stall the rollout


def _number_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) * len(str(abs(left))) > MAX_DIGITS:
            raise CallError("the power is too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CallError("division by zero") from None
        if len(str(value)) > MAX_DIGITS:
            raise CallError("the result is too large")
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    raise CallError("the calculator takes numbers, + - * / // % ** and parentheses only")


def calculator(expression: str = "") -> str:
    if not isinstance(expression, str) or not expression.strip():
        raise CallError('calculator needs {"expression": "..."}')
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CallError(f"cannot parse {expression.strip()!r}") from None
    return _number_text(_eval(tree))


# -------------------------------------------------------------------------------------------- python
def python(code: str = "", *, timeout_s: float = 5.0, memory_mb: int = 256) -> str:
    from rlhf_system.envs.sandbox import run_python

    if not isinstance(code, str) or not code.strip():
        raise CallError('python needs {"code": "..."}')
    ok, out = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
    if not ok:
        raise CallError(out.removeprefix("error: "))
    return out


TOOLS = {"calculator": calculator, "python": python}
