"""The reward server with real models and a real PPO run: it serves a reward model; a PPO run that scores
through it (rewards.remote_url) stops with one line naming what died (its vLLM engine, then the reward
server) and resumes each time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_system.checkpoint import checkpoint_root, complete_checkpoints
from rlhf_system.rewards.client import RemoteReward

from .test_faults import latest_step, ppo_cmd, start, wait_until

pytestmark = pytest.mark.integration
TOKEN = "reward-server-token"


def test_serves_a_reward_model(small_model):
    """The scores over HTTP are the reward model's own (as `rlhf eval` loads it), plus the rule's."""
    from rlhf_system.models.reward_score import load_reward_scorer
    from rlhf_system.rewards.server import RewardServer, Scorer

    scorer = load_reward_scorer(small_model["reward"])
    turns = [[{"role": "user", "content": f"{i} + 1"}] for i in range(6)]
    responses = [str(i + 1) if i % 2 else "no idea" for i in range(6)]
    want = scorer.score([{"messages": t, "response": r} for t, r in zip(turns, responses)])
    assert len(set(want)) > 1  # distinct scores, so a mix-up of items would show
    with RewardServer(Scorer(None, scorer, model_weight=2.0), TOKEN) as server:
        got = RemoteReward(server.url, TOKEN, batch_size=4).score([json.dumps(t) for t in turns], responses, [{}] * 6)
    assert got == pytest.approx([2.0 * w for w in want], abs=1e-5)


def _serve(port: int) -> subprocess.Popen:
    """`rlhf serve-reward` as a user starts it; returns once it prints its URL (it is listening then)."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_system.cli", "serve-reward", "--rules", "synthetic",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RLHF_REWARD_TOKEN": TOKEN}, stdin=subprocess.DEVNULL)
    line = proc.stdout.readline()
    assert json.loads(line)["url"] == f"http://127.0.0.1:{port}", proc.stderr.read()[-2000:]
    return proc


def _stopped(proc: subprocess.Popen, run: Path) -> tuple[str, int]:
    """Wait for a run that is to fail: exit 1 with one error line (returned, with the last checkpoint's step)."""
    _, err = proc.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, err[-3000:]
    assert "checkpoint.resume=auto" in errors[0], errors[0]
    assert not (run / "result.json").exists()  # the run did not finish
    return errors[0], latest_step(run)


def test_a_dead_engine_or_reward_server_stops_the_run_by_name_and_it_resumes(small_model, synthetic_dir, tmp_path,
                                                                               monkeypatch):
    """PPO scoring through `rlhf serve-reward` (rewards.remote_url). 1: the vLLM engine's process is
    killed after a checkpoint: the run stops naming engine 0. 2: resumed (resume=auto) from that checkpoint,
    it goes on scoring remotely until the reward server is killed: the client retries with backoff and the
    run stops naming the server. (That a resumed run then equals a straight one is test_resume's.)"""
    import psutil

    from .ray_nodes import free_port

    monkeypatch.setenv("RLHF_REWARD_TOKEN", TOKEN)
    port = free_port()
    run = tmp_path / "run"
    remote = ["rewards.rules=[]", f"rewards.remote_url=http://127.0.0.1:{port}", "rewards.retries=2",
              "checkpoint.save_every=1", "train.max_steps=30"]
    server = _serve(port)
    procs = [server]
    try:
        proc = start(ppo_cmd(small_model, synthetic_dir, run, *remote))
        procs.append(proc)
        wait_until(proc, lambda: complete_checkpoints(checkpoint_root(run)), "checkpoint")
        engines = [p for p in psutil.process_iter(["cmdline"])
                   if any("RolloutWorker" in part for part in (p.info["cmdline"] or []))]
        assert engines, "no RolloutWorker process found"
        for p in engines:
            p.kill()
        error, first = _stopped(proc, run)
        assert "engine 0" in error, error

        proc = start(ppo_cmd(small_model, synthetic_dir, run, *remote, "checkpoint.resume=auto"))
        procs.append(proc)
        wait_until(proc, lambda: latest_step(run) > first, "a checkpoint after resuming")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        error, second = _stopped(proc, run)
        assert f"reward server http://127.0.0.1:{port}/score unreachable after 2 retries" in error, error
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert second > first
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/remote" in r for r in logged if "reward/total" in r)  # every step scored remotely
    resumed = [r["resumed_from"] for r in logged if "resumed_from" in r]
    assert [Path(r).name for r in resumed] == [f"step_{first:08d}"]
