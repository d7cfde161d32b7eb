"""One long-lived Python process that runs `rlhf` command lines one after another through
rlhf_system.cli.main, on one Ray cluster it starts once (as the CLI does: ensure_ray).

For reference runs whose only job is to be uninterrupted (test_resume.py's straight runs): each pays
neither the interpreter's imports (torch, transformers, DeepSpeed, vLLM) nor Ray's start-up again. The
runs whose process matters (killed, preempted, resumed) stay fresh `rlhf` processes.

    with CliHost(log) as host:
        host.run(["train", "sft", "--config", ...])   # fails the test with the log's end unless main returns 0

The host's stdout and stderr (the runs' output) go to `log`; replies come back on a pipe of their own.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPUS = 4  # Ray CPU slots: the largest straight run (GAE: actor, critic, reference) fits


class CliHost:
    def __init__(self, log: Path):
        self.log_path = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> CliHost:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.cli_host"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        return self

    def run(self, argv: list[str], timeout: float = 900) -> None:
        """`rlhf ARGV` in the host; returns once it finished with exit code 0."""
        assert self.proc is not None and self.proc.poll() is None, self._tail()
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while not select.select([self.proc.stdout], [], [], 1.0)[0]:
            assert self.proc.poll() is None, f"the CLI host exited ({self.proc.returncode}):\n{self._tail()}"
            assert time.monotonic() < deadline, f"`rlhf {' '.join(argv[:2])}` not done within {timeout:g} s"
        line = self.proc.stdout.readline()
        assert line, f"the CLI host exited:\n{self._tail()}"
        assert json.loads(line)["rc"] == 0, self._tail()

    def _tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # the host's loop ends: it shuts Ray down and exits
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()


def serve() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the runs print goes to the log, not into the replies
    sys.stdout = os.fdopen(1, "w", buffering=1)

    import ray

    from rlhf_system.cli import main
    from rlhf_system.placement.group import ensure_ray

    ensure_ray(CPUS)
    try:
        for line in sys.stdin:
            rc = main(json.loads(line))
            sys.stdout.flush()
            replies.write(json.dumps({"rc": rc}) + "\n")
            replies.flush()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    serve()
