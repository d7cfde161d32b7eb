"""Tracker: metrics.jsonl, tensorboard events, offline wandb without a key, PNG plots."""

import json

import pytest

from rlhf_system.config import LoggingConfig
from rlhf_system.tracking import Tracker


def test_jsonl_tensorboard_plots(tmp_path, capsys):
    t = Tracker(tmp_path, LoggingConfig(tensorboard=True), total_steps=4)
    for step in range(1, 5):
        t.log(step, {"loss": 2.0 / step, "lr": 1e-3, "tokens_per_s": 100.0 * step})
    t.log(4, {"eval_loss": 0.6})
    plots = t.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and rows[1]["loss"] == 1.0
    assert sorted(p.name for p in plots) == ["loss.png", "lr.png", "throughput.png"]
    assert all(p.stat().st_size > 1000 for p in plots)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    err = capsys.readouterr().err
    assert "[#####...............] 1/4" in err and "eta" in err


def test_wandb_offline_without_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t = Tracker(tmp_path, LoggingConfig(wandb=True, console=False, plots=False), total_steps=2,
                config={"optim": {"lr": 1e-3}})
    t.log(1, {"loss": 1.0})
    t.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_ppo_plots_reward_kl_and_time_split(tmp_path):
    t = Tracker(tmp_path, LoggingConfig(console=False), total_steps=3)
    for step in (1, 2, 3):
        t.log(step, {"reward/total": 0.1 * step, "kl": 0.01 * step, "actor/pg_loss": -0.1, "time/generate": 0.5,
                     "time/reward": 0.1, "time/inference": 0.3, "time/train": 1.0, "time/sync": 0.05})
    names = sorted(p.name for p in t.close())
    assert names == ["kl.png", "ppo_loss.png", "reward.png", "time_split.png"], names


def test_closing_a_run_that_never_logged_does_not_raise(tmp_path):
    """A run that fails before its first metrics line closes its tracker in cleanup: that must not raise
    (a FileNotFoundError on metrics.jsonl used to replace the error that stopped the run)."""
    t = Tracker(tmp_path, LoggingConfig(console=False), total_steps=10)
    assert t.close() == [] and not (tmp_path / "plots").exists()


def test_a_ppo_start_up_error_is_the_one_reported(tmp_path, monkeypatch):
    """When the roles fail to start, the user sees that failure, not an error from the cleanup after it."""
    from rlhf_system.config import ConfigError, RunConfig
    from rlhf_system.trainers import ppo

    cfg = RunConfig(mode="ppo", run_dir=str(tmp_path / "run"))
    cfg.logging.console = False
    monkeypatch.setattr(ppo, "prepare", lambda cfg: ppo.Prepared(None, None, {}, steps=1))

    def fail_to_start(cfg, prep):
        raise ConfigError("model.dtype=float16 on CPU: the engine died at start-up")

    monkeypatch.setattr(ppo, "start", fail_to_start)
    with pytest.raises(ConfigError, match="the engine died at start-up"):
        ppo.run(cfg)
