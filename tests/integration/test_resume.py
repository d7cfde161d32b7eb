"""Resume equivalence with a real kill: N steps straight == k steps, SIGKILL, resume, N-k steps.

The interrupted run is killed (SIGKILL to its whole process group) as soon as its first checkpoint
is published; the resumed run picks the latest complete checkpoint (`checkpoint.resume=auto`) and
must end with the same parameters as the straight run within 1e-6 (CPU, fp32).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_system.checkpoint import complete_checkpoints

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
N_STEPS = 10


def command(mode: str, model: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    train, test = {"sft": ("sft_train", "sft_test_seen"), "rm": ("pref_train", "pref_test"),
                   "dpo": ("pref_train", "pref_test")}[mode]
    return [sys.executable, "-m", "rlhf_system.cli", "train", mode, "--config", f"configs/{mode}/tiny-cpu.yaml",
            f"model.path={model}", f"run_dir={run_dir}", f"train.max_steps={N_STEPS}", "logging.console=false",
            "checkpoint.save_every=2", "checkpoint.keep_last=2", "train.max_eval_samples=16",
            f"data.train=[{{path: {data / (train + '.jsonl')}}}]", f"data.eval=[{{path: {data / (test + '.jsonl')}}}]",
            *extra]


def run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]


def kill_after_first_checkpoint(cmd: list[str], run_dir: Path) -> int:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not complete_checkpoints(run_dir / "checkpoints"):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done = complete_checkpoints(run_dir / "checkpoints")
    return json.loads((done[-1] / "run_state.json").read_text())["step"]


MODEL_FOR = {"sft": "policy", "rm": "policy", "dpo": "policy"}  # rm: value head on the policy (the shipped config)


# Streamed data (each rank reads its own share of the stream; its position is in the checkpoint): the SFT
# stream on two ranks, and DPO, whose reference scores each streamed step instead of a precomputed table.
STREAMING = ("data.streaming=true", "algorithm.dpo.precompute_reference=true")
CASES = {"sft": ("sft", ()), "rm": ("rm", ()), "dpo": ("dpo", ()),
         "sft-streaming-2-ranks": ("sft", (*STREAMING, "placement.actor=2")), "dpo-streaming": ("dpo", STREAMING)}


@pytest.mark.parametrize("case", list(CASES))
def test_kill_and_resume_matches_straight_run(case, small_model, synthetic_dir, tmp_path):
    mode, extra = CASES[case]
    model = small_model[MODEL_FOR[mode]]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run(command(mode, model, synthetic_dir, straight, *extra))

    killed_at = kill_after_first_checkpoint(command(mode, model, synthetic_dir, broken, *extra), broken)
    assert 0 < killed_at < N_STEPS, killed_at
    assert not (broken / "hf").exists()  # it really died before finishing
    run(command(mode, model, synthetic_dir, broken, *extra, "checkpoint.resume=auto"))

    a, b = load_file(straight / "hf" / "model.safetensors"), load_file(broken / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    logged = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert any("resumed_from" in row for row in logged)
