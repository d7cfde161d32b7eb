"""A full disk during a checkpoint, with a real run on a small tmpfs: the error names the path and the
free space, the previous checkpoint stays intact, and resume goes on from it. (A SIGKILLed controller and
preemption are in test_resume.py, where the resumed run must also equal a straight one; a killed reward
server is in test_reward_server.py.) The PPO helpers here are shared with test_reward_server.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_system.checkpoint import checkpoint_root, complete_checkpoints, damage

from .conftest import REPO, train_args

pytestmark = pytest.mark.integration


def ppo_cmd(small_model, d: Path, run_dir: Path, *extra: str) -> list[str]:
    """The shipped GRPO config on the small model, shrunk: rule reward, no critic, no held-out sets."""
    return [sys.executable, "-m", "rlhf_system.cli", "train", "ppo", "--config", "configs/grpo/tiny-cpu.yaml",
            f"model.path={small_model['policy']}", f"run_dir={run_dir}", f"data.train=[{{path: {d / 'rl_train.jsonl'}}}]",
            "data.eval=[]", "train.eval_every=0", "train.rollout_batch_size=8", "rollout.n_samples_per_prompt=2",
            "train.global_batch_size=16", "train.micro_batch_size=8", "rollout.max_new_tokens=16",
            "logging.console=false", "placement.call_timeout_s=240", "checkpoint.export_hf=false", *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def wait_until(proc: subprocess.Popen, done, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.2)


def latest_step(run_dir: Path) -> int:
    return json.loads((complete_checkpoints(checkpoint_root(run_dir))[-1] / "run_state.json").read_text())["step"]


def finish(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------ full disk
@pytest.fixture()
def small_disk(tmp_path):
    """A 12 MiB tmpfs: room for one or two checkpoints of the small model (~5 MB each), not four."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_the_last_checkpoint_and_says_so(small_model, synthetic_dir, small_disk, tmp_path):
    run = small_disk / "run"
    cmd = [sys.executable, "-m", "rlhf_system.cli", *train_args(
        "sft", "configs/sft/tiny-cpu.yaml", small_model["policy"], run, synthetic_dir / "sft_train.jsonl",
        synthetic_dir / "sft_test_seen.jsonl", "train.max_steps=4", "checkpoint.save_every=1",
        "checkpoint.keep_last=2", "checkpoint.export_hf=false", "train.max_eval_samples=8", "logging.plots=false")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 1 and len(errors) == 1, out.stderr[-3000:]
    failed = re.search(rf"checkpoint {run}/checkpoints/step_(\d+)\.tmp: write failed \(the disk is full\); "
                       r"0 MiB free on .*; step_(\d+) is intact \(resume uses it\)", errors[0])
    assert failed and int(failed[2]) == int(failed[1]) - 1 >= 1, errors[0]
    done = complete_checkpoints(checkpoint_root(run))
    assert done[-1].name == f"step_{failed[2]}" and all(damage(p) is None for p in done)
    assert not list(checkpoint_root(run).glob("*.tmp"))  # the partial save was removed
    last_good = int(failed[2])

    # The run folder moves to a disk with room (run_dir may change on resume), and goes on from step 1.
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-a", str(run), str(moved)], check=True)
    cmd[cmd.index(f"run_dir={run}")] = f"run_dir={moved}"
    finish([*cmd, "checkpoint.resume=auto"])
    assert json.loads((moved / "result.json").read_text())["steps"] == 4
    resumed = [json.loads(x) for x in (moved / "metrics.jsonl").read_text().splitlines() if "resumed_from" in x]
    assert resumed and resumed[-1]["step"] == last_good
