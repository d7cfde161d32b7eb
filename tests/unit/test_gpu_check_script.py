"""tests/gpu/run_checks.sh (the GPU checks for a lent device, tests/gpu/README.md) on a machine without CUDA:
it skips every check cleanly, fast, and prints nothing but one JSON line per check."""

import json
import os
import subprocess
import time
from pathlib import Path

from tests.gpu.checks.common import finite_and_down, missing_import

REPO = Path(__file__).resolve().parents[2]
CHECKS = {"sft", "rm", "dpo", "families", "grpo_nccl", "grpo_colocated", "fa2_packing", "gkd_forward",
          "rollout_tokens_per_s"}


def test_without_cuda_every_check_skips_with_a_reason():
    # CUDA hidden, so that this stays the skip path on a machine that has a GPU too
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_GPU_CHECK")} | {"CUDA_VISIBLE_DEVICES": ""}
    t = time.perf_counter()
    out = subprocess.run(["bash", "tests/gpu/run_checks.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=30, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    rows = [json.loads(line) for line in lines]  # nothing but JSON on stdout
    assert sorted(r["check"] for r in rows) == sorted(CHECKS), lines  # one line per check
    for r in rows:
        assert r["ok"] is None and r["skipped"] == "no CUDA device", r
    assert seconds < 30


def test_a_package_missing_on_the_run_path_is_named_with_its_import_site():
    """A run that failed for a package this machine lacks is a skip naming where our code imports it;
    a module of ours that is missing is a bug, not a skip."""
    log = f'''Traceback (most recent call last):
  File "{REPO}/rlhf_system/placement/group.py", line 244, in __init__
    self.workers[0].init_dist(0, 1, "127.0.0.1", None, on_gpu(p))
  File "{REPO}/rlhf_system/distributed/net.py", line 30, in pin_gloo_interface
    import ray
ModuleNotFoundError: No module named 'ray'
'''
    assert missing_import(log) == ("ray", "rlhf_system/distributed/net.py:30 (pin_gloo_interface)")
    assert missing_import(log.replace("'ray'", "'rlhf_system.gone'")) is None
    assert missing_import("ValueError: bad") is None


def test_loss_went_down():
    assert finite_and_down([7.4, 7.1, 6.9, 6.0, 5.2, 5.0, 4.9])
    assert not finite_and_down([7.4, 7.1, float("nan"), 5.0])
    assert not finite_and_down([5.0, 5.1, 5.0, 5.2, 5.3, 5.1])
