"""Faults a long run meets, with real processes: a SIGKILLed controller, preemption (SIGTERM), a full
disk. Each checks what is left behind (the process table, listening ports, checkpoints) and that
`checkpoint.resume=auto` goes on from the right place."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
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


def logged_steps(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [r["step"] for r in map(json.loads, f.read_text().splitlines()) if "reward/total" in r]


def latest_step(run_dir: Path) -> int:
    return json.loads((complete_checkpoints(checkpoint_root(run_dir))[-1] / "run_state.json").read_text())["step"]


def finish(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_killed_controller_leaves_nothing_and_preemption_checkpoints(small_model, synthetic_dir, tmp_path):
    run = tmp_path / "run"
    # 1. SIGKILL the controller once a checkpoint is out: no process of the run and no port it listened
    #    on outlives it (distributed/reaper.py stops what Ray's own shutdown would have).
    proc = start(ppo_cmd(small_model, synthetic_dir, run, "train.max_steps=30", "checkpoint.save_every=1"))
    try:
        wait_until(proc, lambda: complete_checkpoints(checkpoint_root(run)), "checkpoint")
        tree = psutil.Process(proc.pid).children(recursive=True)
        procs = {p.pid: p.create_time() for p in tree}
        ports = {c.laddr.port for p in tree for c in _listening(p)}
        assert len(procs) >= 5 and ports, (procs, ports)  # Ray's processes, the trainers, the engine
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 60
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, [" ".join(p.cmdline())[:100] for p in alive]
    still = {c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN} & ports
    assert not still, f"ports still listening: {still}"

    # 2. Preemption: SIGTERM after the resumed run has taken a step of its own. It finishes that step,
    #    checkpoints it (save_every=0: no other checkpoint would be written) and exits 0, in time.
    killed_at = latest_step(run)
    proc = start(ppo_cmd(small_model, synthetic_dir, run, "train.max_steps=30", "checkpoint.save_every=0",
                         "checkpoint.resume=auto"))
    try:
        wait_until(proc, lambda: any(s > killed_at for s in logged_steps(run)), "a step after resuming")
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received" in err
    result = json.loads((run / "result.json").read_text())
    stopped_at = latest_step(run)
    assert result["stopped_by"] == "SIGTERM" and result["steps"] == stopped_at > killed_at, (result, stopped_at)
    assert took < 120 and damage(complete_checkpoints(checkpoint_root(run))[-1]) is None

    # 3. resume=auto goes on from the preemption's checkpoint to the end.
    finish(ppo_cmd(small_model, synthetic_dir, run, f"train.max_steps={stopped_at + 1}", "checkpoint.resume=auto"))
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == stopped_at + 1 and "stopped_by" not in result
    resumed = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "resumed_from" in x]
    assert resumed[-1]["step"] == stopped_at


def _listening(p: psutil.Process) -> list:
    try:
        return [c for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def _alive(procs: dict[int, float]) -> list[psutil.Process]:
    out = []
    for pid, created in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
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
