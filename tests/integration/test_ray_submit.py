"""`bash launch/ray_submit.sh` against a real Ray head with token auth (a `ray start --head` of its own,
see ray_nodes.py): the tiny PPO config runs as a Ray Job and writes its run folder at an absolute
run_dir; a config error fails the job, the script exits non-zero, and our one-line message is in
`ray job logs`."""

import json
import re
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO
from tests.integration.ray_nodes import RAY, start_cluster, stop_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head():
    cluster = start_cluster([{"num_cpus": 4}], dashboard=True)
    yield cluster
    stop_cluster(cluster)


TASK_SCALING = "test_task_scaling_experiment_runs_as_a_ray_job"


@pytest.fixture(scope="module", autouse=True)
def task_scaling_job(request, head, tmp_path_factory):
    """The task-scaling experiment's launcher (test_task_scaling_...), started with the module when that
    test is selected, so that its job runs beside the other tests' jobs (the head has CPU slots for both;
    a run leaves part of 2 cores idle). Yields (launcher process, its log folder, the output folder)."""
    if not any(item.name == TASK_SCALING for item in request.session.items):
        yield None
        return
    tmp = tmp_path_factory.mktemp("task-scaling")
    out_dir = tmp / "out"
    cmd = ["bash", "launch/ray_submit.sh", "--address", head.dashboard_url, "--no-upload", "--", "rlhf", "experiment",
           "task-scaling", "--smoke", "--seeds", "0", "--counts", "1", "--out", str(out_dir)]
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:  # files: no pipe to fill up
        proc = subprocess.Popen(cmd, cwd=REPO, env=head.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    yield proc, tmp, out_dir
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


def submit(head, *args, timeout=600) -> tuple[subprocess.CompletedProcess, str]:
    """Run the launcher; returns the finished process and the job's submission id."""
    cmd = ["bash", "launch/ray_submit.sh", "--address", head.dashboard_url, *args]
    out = subprocess.run(cmd, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    ids = re.findall(r"\[ray_submit\] job (rlhf-\S+)", out.stderr)
    assert ids, out.stdout[-2000:] + out.stderr[-3000:]
    return out, ids[0]


def ray_job(head, *args) -> str:
    out = subprocess.run([RAY, "job", *args, "--address", head.dashboard_url], env=head.env, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    return out.stdout + out.stderr


def job_status(head, job_id) -> str:
    code = ("import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    out = subprocess.run([sys.executable, "-c", code, head.dashboard_url, job_id],
                         env=head.env, capture_output=True, text=True, timeout=120)
    return out.stdout.strip() or out.stderr[-1000:]


def test_tiny_ppo_config_runs_as_a_ray_job(head, family_models, synthetic_dir, tmp_path):
    """The README's PPO command, shrunk like test_ppo's, through the launcher (code uploaded as the
    job's working_dir): SUCCEEDED, exit 0, and the run folder at the absolute run_dir. REINFORCE++ on a
    tiny Mistral (models/families.py)."""
    small_model = family_models["mistral"]
    run_dir = tmp_path / "ppo"
    d = synthetic_dir
    out, job_id = submit(
        head, "--env", "RLHF_SUBMIT_TEST=1", "--",
        "rlhf", "train", "ppo", "--config", "configs/ppo/tiny-cpu.yaml",
        f"model.path={small_model['policy']}", f"run_dir={run_dir}",
        f"data.train=[{{path: {d / 'rl_train.jsonl'}}}]", f"data.eval=[{{path: {d / 'rl_test_seen.jsonl'}}}]",
        # one step, two roles + one engine: the five-role run is test_ppo's; this test is about the launcher
        # (and that a critic-free estimator starts no critic)
        "algorithm.estimator=reinforce_pp", "rewards.use_model=false", "train.max_steps=1", "train.eval_every=0",
        "train.rollout_batch_size=8", "train.global_batch_size=16", "train.micro_batch_size=8",
        "train.max_eval_samples=8", "rollout.max_new_tokens=16", "logging.console=false",
        "placement.call_timeout_s=240")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert job_status(head, job_id) == "SUCCEEDED"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 1 and sorted(result["roles"]) == ["actor", "reference", "rollout"]
    assert (run_dir / "hf" / "config.json").exists() and (run_dir / "config.yaml").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r.get("step") == 1 and "actor/loss" in r)
    assert not any(k.startswith("critic/") for k in step)
    # the job's own logs are the run's output (streamed by the launcher as well)
    assert '"steps": 1' in out.stdout


def test_failed_job_exits_nonzero_with_our_message(head):
    """A mistyped key fails the job at config validation; no upload (--no-upload) is needed for that:
    the command runs in this checkout on the head node."""
    out, job_id = submit(head, "--no-upload", "--", "rlhf", "train", "ppo", "--config", "configs/ppo/tiny-cpu.yaml",
                         "optim.lrr=1", timeout=300)
    assert out.returncode != 0
    assert job_status(head, job_id) == "FAILED"
    logs = ray_job(head, "logs", job_id)
    assert re.search(r"error: unknown config key 'optim\.lrr'.*: did you mean 'optim\.lr'\?", logs), logs[-2000:]
    assert f"job {job_id}: FAILED" in out.stderr


def test_task_scaling_experiment_runs_as_a_ray_job(head, task_scaling_job):
    """`rlhf experiment task-scaling --smoke` through the launcher: the SFT point runs as a Ray actor of
    the job (RAY_ADDRESS is set), a JSON line per point reaches the launcher's stdout, and the folder holds
    the results, the table and the plot. The launcher is the task_scaling_job fixture's."""
    proc, logs, out_dir = task_scaling_job
    proc.wait(timeout=600)
    stdout, stderr = (logs / "stdout").read_text(), (logs / "stderr").read_text()
    ids = re.findall(r"\[ray_submit\] job (rlhf-\S+)", stderr)
    assert ids, stdout[-2000:] + stderr[-3000:]
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert job_status(head, ids[0]) == "SUCCEEDED"
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    assert [(r["k"], r["seed"]) for r in rows] == [(0, 0), (1, 0)]
    streamed = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert streamed == rows
    assert rows[1]["steps"] > 0 and len(rows[1]["families"]) == 1
    assert (out_dir / "task_scaling.png").stat().st_size > 0
    assert "| 1 | 1 |" in (out_dir / "task_scaling.md").read_text()
