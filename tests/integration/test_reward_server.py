"""The reward server with real models and a real PPO run: it serves a reward model, and a PPO run that
scores through it (rewards.remote_url) stops naming the server when it is killed, then resumes once
it is back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from rlhf_system.checkpoint import checkpoint_root, complete_checkpoints
from rlhf_system.rewards.client import RemoteReward

from .test_faults import finish, latest_step, ppo_cmd, start, wait_until

pytestmark = pytest.mark.integration
TOKEN = "reward-server-token"


def test_serves_a_reward_model(small_model):
    """The scores over HTTP are the reward model's own (as `rlhf eval` loads it), plus the rule's."""
    from rlhf_system.eval.reward_score import load_reward_scorer
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


def test_ppo_scores_remotely_stops_when_the_server_dies_and_resumes(small_model, synthetic_dir, tmp_path, monkeypatch):
    from .ray_nodes import free_port

    monkeypatch.setenv("RLHF_REWARD_TOKEN", TOKEN)
    port = free_port()
    run = tmp_path / "run"
    remote = ["rewards.rules=[]", f"rewards.remote_url=http://127.0.0.1:{port}", "rewards.retries=2"]
    server = _serve(port)
    proc = None
    try:
        proc = start(ppo_cmd(small_model, synthetic_dir, run, "train.max_steps=30", "checkpoint.save_every=1", *remote))
        wait_until(proc, lambda: complete_checkpoints(checkpoint_root(run)), "checkpoint")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        _, err = proc.communicate(timeout=300)
    finally:
        for p in (proc, server):
            if p is not None and p.poll() is None:
                p.kill()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, err[-3000:]
    assert f"reward server http://127.0.0.1:{port}/score unreachable after 2 retries" in errors[0], errors[0]
    assert "checkpoint.resume=auto" in errors[0]
    step = latest_step(run)
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/remote" in r for r in logged if "reward/total" in r)  # every step scored remotely

    server = _serve(port)  # back on the same address: the run goes on from its checkpoint
    try:
        finish(ppo_cmd(small_model, synthetic_dir, run, f"train.max_steps={step + 1}", "checkpoint.resume=auto", *remote))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert json.loads((run / "result.json").read_text())["steps"] == step + 1
