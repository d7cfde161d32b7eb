"""Benchmarks that print one JSON document on stdout (`rlhf bench sft|ppo`); everything else goes to stderr."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout inside the block to stderr, at the file-descriptor level:
    Ray forwards its workers' log lines to the driver's stdout, and DeepSpeed's JIT builds and vLLM
    write there too, so redirecting `sys.stdout` alone would still mix them into the JSON. Yields
    `emit(line)`, which writes a line to the real stdout from inside the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)

    def emit(line: str) -> None:
        os.write(saved, (line + "\n").encode())

    try:
        yield emit
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
