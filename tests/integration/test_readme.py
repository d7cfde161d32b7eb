"""The README's commands, run as a newcomer would run them (the test command itself is CI's .ci/run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_readme_config_command():
    out = subprocess.run([sys.executable, "-m", "rlhf_system.cli", "config", "--config", "configs/sft/tiny-cpu.yaml",
                          "optim.lr=2e-5", "data.max_len=512"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["optim"]["lr"] == 2e-5 and cfg["data"]["max_len"] == 512 and cfg["mode"] == "sft"


def test_demo_smoke_runs_every_stage(tmp_path):
    """`bash launch/demo.sh --smoke --with-feedback` (CI's variant of the main job): data, tiny model, SFT,
    reward model, simulated feedback on SFT samples through the feedback app and a reward model trained on
    it, PPO and the base / SFT / RLHF evaluation at toy sizes; every stage leaves its outputs."""
    from rlhf_system.demo import expected_outputs, feedback_outputs

    out_dir = tmp_path / "demo"
    out = subprocess.run(["bash", "launch/demo.sh", "--smoke", "--with-feedback", "--out", str(out_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                         env={**os.environ, "CI": "true"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for path in expected_outputs(out_dir) + feedback_outputs(out_dir):
        assert path.exists(), path
    assert "| simulated feedback on SFT samples |" in (out_dir / "report.md").read_text()
    for stage in ("1/6: data", "3/6: sft", "4/6: rm", "5/6: ppo", "6/6: eval"):
        assert f"stage {stage}" in out.stdout, stage
    manifest = json.loads((out_dir / "data" / "manifest.json").read_text())
    assert manifest["demo_flaws"] == 0.3 and manifest["flawed_sft_rows"] > 0
    ppo = json.loads((out_dir / "ppo" / "result.json").read_text())
    assert ppo["steps"] == 2 and sorted(ppo["roles"]) == ["actor", "critic", "reference", "reward", "rollout"]
    report = json.loads((out_dir / "eval.json").read_text())
    assert list(report) == ["base", "SFT", "RLHF (PPO)"]
    for entry in report.values():
        a = entry["alignment"]
        assert a["n_exact_unseen"] > 0 and a["n_exact_composed"] > 0 and a["n_harmless"] > 0
        assert a["rm_score"] is not None
    table = (out_dir / "report.md").read_text()
    assert "| RLHF (PPO) |" in table and "harmless" in table and "exact (unseen: composed)" in table
    # the task-scaling experiment's shipped figures (too long for the demo) are quoted and copied
    assert "rlhf experiment task-scaling" in table and (out_dir / "task_scaling.png").stat().st_size > 0
