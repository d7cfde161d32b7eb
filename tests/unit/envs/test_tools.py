"""Tools (envs/tools.py), the python sandbox (envs/sandbox.py) and the tools environment (envs/tool_env.py)."""

import pytest

from rlhf_system.envs.base import EnvError
from rlhf_system.envs.registry import load_env
from rlhf_system.envs.sandbox import run_python
from rlhf_system.envs.tool_env import ToolEnv
from rlhf_system.envs.tools import TOOLS, Call, CallError, calculator, format_call, parse_calls


def test_calculator_evaluates_arithmetic_from_the_syntax_tree():
    assert calculator("48213 * 79132") == str(48213 * 79132)
    assert calculator(" (12 + 3) * -2 ") == "-30"
    assert calculator("7 / 2") == "3.5" and calculator("6 / 3") == "2" and calculator("7 // 2") == "3"
    assert calculator("2 ** 10") == "1024"
    for bad, why in [("__import__('os')", "numbers, \\+ - \\* /"), ("2 ** 1000", "too large"), ("1 / 0", "division by zero"),
                     ("1 +", "cannot parse"), ("", "needs")]:
        with pytest.raises(CallError, match=why):
            calculator(bad)


def test_parse_calls_reads_every_block_and_names_what_is_wrong():
    text = (format_call("calculator", expression="1 + 2") + " and " + "<tool_call>{not json}</tool_call>"
            + '<tool_call>{"name": "shell", "arguments": {}}</tool_call>' + '<tool_call>{"arguments": {}}</tool_call>'
            + '<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>' + "<tool_call>{")
    calls = parse_calls(text, TOOLS)
    assert calls[0] == Call("calculator", {"expression": "1 + 2"})
    assert [str(c).split(" (")[0] for c in calls[1:]] == [
        "the tool call is not valid JSON", "unknown tool 'shell'; tools: calculator, python",
        'a tool call needs {"name": ..., "arguments": {...}}', "the arguments of 'calculator' must be an object",
        "a tool call opened with <tool_call> is never closed with </tool_call>"]
    assert parse_calls("The answer is 3.", TOOLS) == []


def test_sandbox_limits():
    assert run_python("print(sum(range(10)))") == (True, "45")
    cases = {
        "while True: pass": "timed out after 1 s",
        "x = bytearray(2 * 1024 ** 3)": "memory limit",
        "open('out.txt', 'w').write('x')": "opening files for writing is not allowed",
        "import socket; socket.create_connection(('127.0.0.1', 9))": "socket",
        "import subprocess; subprocess.run(['true'])": "subprocess.Popen is not allowed",
        "import os; os.remove('/tmp/x')": "os.remove is not allowed",
        "raise ValueError('bad input')": "ValueError: bad input",
    }
    for code, why in cases.items():
        ok, out = run_python(code, timeout_s=1)
        assert not ok and why in out, (code, out)


def test_tool_env_runs_calls_and_counts_failures():
    env = load_env("tools")(tools=["calculator", "python"], tool_timeout_s=1)
    step = env.step("Let me compute. " + format_call("calculator", expression="123 * 456"))
    assert step.observation == [{"role": "tool", "content": "56088"}] and not step.done
    assert step.info == {"tool_calls": 1, "tool_errors": 0, "tool_timeouts": 0}
    step = env.step(format_call("calculator", expr="1") + format_call("python", code="while True: pass")
                    + "<tool_call>oops</tool_call>")
    assert [m["content"].split(" (")[0] for m in step.observation] == [
        "error: bad arguments for 'calculator'", "error: timed out after 1 s", "error: the tool call is not valid JSON"]
    assert step.info == {"tool_calls": 3, "tool_errors": 3, "tool_timeouts": 1}
    final = env.step("56088")
    assert final.done and final.observation is None and final.reward == 0.0


def test_unknown_tool_or_environment_is_a_one_line_error():
    with pytest.raises(EnvError, match=r"unknown tool\(s\) \['shell'\] in rollout.tools; available: calculator, python"):
        ToolEnv(tools=["calculator", "shell"])
    with pytest.raises(EnvError, match=r"unknown environment 'gym' \(rollout.env\); registered: tools"):
        load_env("gym")
    with pytest.raises(EnvError, match="environment file .*nope.py not found"):
        load_env("nope.py:Env")
