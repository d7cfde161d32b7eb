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


def test_demo_runs_end_to_end():
    """`bash launch/demo.sh`: data, tiny models, SFT, evaluation and vLLM samples, under runs/demo."""
    env = {**os.environ, "CI": "true"}
    # One SFT epoch instead of three keeps CI quick; the override path is the README's too.
    out = subprocess.run(["bash", "launch/demo.sh", "train.epochs=1"], cwd=REPO, capture_output=True, text=True, timeout=900,
                         stdin=subprocess.DEVNULL, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = REPO / "runs" / "demo"
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["seed"] == 0
    assert (run / "tiny" / "policy" / "model.safetensors").exists()
    assert yaml.safe_load((run / "sft" / "config.yaml").read_text())["data"]["packing"] is True
    assert (run / "sft" / "hf" / "model.safetensors").exists() and (run / "sft" / "plots" / "loss.png").exists()
    sft = json.loads((run / "sft" / "result.json").read_text())
    assert sft["final"]["eval_loss"] < sft["initial"]["eval_loss"]
    seen = json.loads((run / "eval_test_seen.json").read_text())
    assert seen["runs/demo/sft/hf"]["all"]["n"] == 200
    assert seen["runs/demo/sft/hf"]["all"]["exact"] > seen["runs/demo/tiny/policy"]["all"]["exact"]
    last = json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"backend"')))
    assert last["backend"] == "vllm" and last["prompts"] == 64
