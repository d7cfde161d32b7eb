"""ensure_ray's runtime_env when the driver runs as a Ray Job (`ray job submit`, launch/ray_submit.sh):
Ray refuses a driver runtime_env that repeats an env var of the job's own runtime_env ("Failed to merge
the Job's runtime env ... because of a conflict"), so those keys are left to the job. No Ray is started:
ray.init is replaced by a recorder, and Ray's own merge rule judges the result."""

import json


def test_driver_inside_a_ray_job_leaves_the_jobs_env_vars_to_the_job(monkeypatch):
    import ray
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from rlhf_system.placement import group

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    job_env = {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"HF_HUB_OFFLINE": "1"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))

    group.ensure_ray()
    driver_env = calls[0]["runtime_env"]
    assert calls[0]["address"] == "127.0.0.1:6379"
    assert "HF_HUB_OFFLINE" not in driver_env["env_vars"] and driver_env["env_vars"]["WANDB_MODE"] == "offline"
    assert _merge_runtime_env(job_env, driver_env) is not None  # what ray.init does with the two: no conflict
    assert _merge_runtime_env(job_env, {"env_vars": {"HF_HUB_OFFLINE": "1"}}) is None  # the conflict it avoids

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # a plain driver still forwards everything
    group.ensure_ray()
    assert calls[1]["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
