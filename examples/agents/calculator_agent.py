"""An agent program for the calculator task, written against the plain `openai` client: the kind of
program rlhf_system trains through its agent endpoint (rollout.agent, docs/rlhf.md "Agent programs").

It asks the model; when the reply is a tool call (<tool_call>{"name": "calculator", "arguments":
{"expression": ...}}</tool_call>), it evaluates the expression itself, sends the result back as a tool
message and asks again. It returns no reward: the run's verifier (rewards.rules=[synthetic]) scores the
last answer. Nothing here knows about training; pointed at any OpenAI-compatible server it runs the same.

    rollout.agent: examples/agents/calculator_agent.py:run                  # in the trainer's process
    rollout.agent: "cmd:python examples/agents/calculator_agent.py"        # as its own process

AGENT_TRACE=path appends each call's prompt and completion token ids (the endpoint returns them) to a
JSON-lines file.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import re
import sys

import httpx
from openai import OpenAI

# One HTTP client for every episode of this process: each new one builds an SSL context (~28 ms of CPU,
# measured), which for 128 episodes a step was most of the agent's time.
HTTP = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))
CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
       ast.Mod: operator.mod, ast.Div: operator.truediv}


def calculate(expression: str) -> str:
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError("only numbers and + - * / // %")

    try:
        value = ev(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as e:
        return f"error: {e}"
    return str(int(value)) if float(value).is_integer() else str(value)


def run(base_url: str, api_key: str, messages: list[dict], meta: dict) -> float | None:
    client = OpenAI(base_url=base_url, api_key=api_key, http_client=HTTP)
    trace = os.environ.get("AGENT_TRACE")
    for _ in range(2):  # a tool call, then the answer
        reply = client.chat.completions.create(model="policy", messages=messages)
        text = reply.choices[0].message.content or ""
        if trace:
            with open(trace, "a") as f:
                f.write(json.dumps({"key": api_key, "prompt_token_ids": reply.model_extra.get("prompt_token_ids"),
                                    "token_ids": reply.choices[0].model_extra.get("token_ids")}) + "\n")
        call = CALL.search(text)
        if call is None:
            return None
        try:
            expression = json.loads(call.group(1))["arguments"]["expression"]
            result = calculate(str(expression))
        except (json.JSONDecodeError, KeyError, TypeError):
            result = "error: a tool call is {\"name\": \"calculator\", \"arguments\": {\"expression\": \"...\"}}"
        messages = messages + [{"role": "assistant", "content": text}, {"role": "tool", "content": result}]
    return None


if __name__ == "__main__":  # the cmd: form: the prompt row on stdin, OPENAI_BASE_URL / OPENAI_API_KEY set
    row = json.load(sys.stdin)
    print(json.dumps(run(os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"], row["messages"], row["meta"])))
