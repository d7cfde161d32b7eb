"""A sandboxed Python evaluator for the `python` tool: the code runs in a child interpreter with limits.

    ok, output = run_python("print(2 ** 10)", timeout_s=5, memory_mb=256)

What the child gets: an empty temporary working directory, `python -I -S` (no site packages, no user
environment, no PYTHON* variables), an address-space limit (RLIMIT_AS), a CPU-time limit (RLIMIT_CPU),
a zero file-size limit (RLIMIT_FSIZE: a write of one byte kills it), no core dumps, and an audit hook,
installed before the code runs and impossible to remove from Python, that refuses sockets, opening
files for writing, deleting or renaming files, and starting processes. The parent kills the child's
whole process group at the wall-clock deadline. Output is stdout and stderr together, cut to
`max_output` characters.

What it is not: a security boundary against a determined adversary (ctypes, or a bug in CPython, can
get past an audit hook). It keeps a policy's arithmetic scripts from hanging, exhausting memory,
writing files or reaching the network during RL. Run untrusted code in a container or a VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

# Runs in the child before the user's code: the limits first (set by the child itself, as a preexec_fn
# is unsafe in the threaded controller), then the audit hook.
# Audit events: https://docs.python.org/3/library/audit_events.html
_PRELUDE = r'''
import resource, sys
_mem, _cpu = (int(v) for v in sys.argv[1:3])
for _what, _value in ((resource.RLIMIT_AS, _mem), (resource.RLIMIT_CPU, _cpu), (resource.RLIMIT_FSIZE, 0),
                      (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_what, (_value, _value))
def _guard(event, args):
    if event.startswith(("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                         "os.system", "os.kill", "os.remove", "os.rename", "os.rmdir", "os.mkdir",
                         "os.truncate", "os.chmod", "os.chown", "os.link", "os.symlink", "shutil.",
                         "ctypes.", "pty.")):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) > 1 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
        raise PermissionError("sandbox: opening files for writing is not allowed")
    if event == "open" and len(args) > 2 and isinstance(args[2], int) and args[2] & 0o3 != 0:
        raise PermissionError("sandbox: opening files for writing is not allowed")
sys.addaudithook(_guard)
del _guard
'''


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 256, max_output: int = 2000) -> tuple[bool, str]:
    """(ok, output): ok is False on an exception, a limit or the deadline, and the output then says which."""
    with tempfile.TemporaryDirectory(prefix="rlhf-sandbox-") as cwd:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PRELUDE + "\nexec(compile(sys.stdin.read(), '<tool>', 'exec'))",
             str(memory_mb * 2**20), str(max(1, int(timeout_s) + 1))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, text=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            start_new_session=True)  # its own process group: the deadline kills everything it started
        try:
            out, _ = proc.communicate(code, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, f"error: timed out after {timeout_s:g} s"
    out = out[-max_output:] if len(out) > max_output else out
    if proc.returncode == 0:
        return True, out.strip()
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit (no writes)", "SIGKILL": "killed"}.get(sig, sig)
        return False, f"error: {why}"
    last = out.strip().splitlines()[-1] if out.strip() else f"exit status {proc.returncode}"
    if "MemoryError" in out:
        last = "MemoryError: memory limit"
    return False, f"error: {last}"
