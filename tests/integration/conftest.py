"""Expensive shared fixtures for integration tests: synthetic data, tiny models, one Ray cluster, and
one SFT run of the shipped tiny config (the SFT learning test checks it; RM and PPO tests start from it)."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_system.config import RunConfig, validate


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from rlhf_system.tasks.files import write_dataset

    out = tmp_path_factory.mktemp("synthetic")
    write_dataset(out, seed=0, n_train=2000, n_test=200)
    return out


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """2 layers, hidden 128: for equivalence tests, where speed matters more than capacity."""
    from rlhf_system.models.tiny import TinySpec, make_tiny_model

    spec = TinySpec(vocab_size=1024, hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2,
                    intermediate_size=256)
    return make_tiny_model(tmp_path_factory.mktemp("small"), spec)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict:
    """Each family of models/families.py as a tiny model (2 layers, hidden 128, its own chat template):
    {family: {"policy": causal LM folder, "reward": its sequence-classification twin}}."""
    from rlhf_system.models.families import FAMILIES
    from rlhf_system.models.tiny import TinySpec, make_tiny_model
    from rlhf_system.tasks.files import corpus_texts

    root = tmp_path_factory.mktemp("families")
    spec = TinySpec(vocab_size=768, hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2, intermediate_size=256)
    corpus = corpus_texts(seed=0)[:3000]
    return {name: make_tiny_model(root / name, spec, corpus=corpus, family=name) for name in FAMILIES}


@pytest.fixture(scope="session")
def kit_model(tmp_path_factory):
    """The kit's default (~3.5M parameters): for learning tests."""
    from rlhf_system.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("kit"))


REPO = Path(__file__).resolve().parents[2]


def rlhf(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`rlhf ARGS` as a user runs it (a fresh process, from the repo root, no standard input, as in CI);
    a non-zero exit fails the test with the end of its stderr."""
    out = subprocess.run([sys.executable, "-m", "rlhf_system.cli", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def train_args(mode: str, config: str, model, run_dir, train, evaluate, *extra: str) -> list[str]:
    """`train MODE --config CONFIG` on a test model and test data files, console off, then `extra`.
    In float32, whatever `dtype: auto` picks on the test host: the measured figures and bounds
    then hold on hosts with and without bf16 matrix units."""
    return ["train", mode, "--config", config, f"model.path={model}", f"run_dir={run_dir}", "logging.console=false",
            f"data.train=[{{path: {train}}}]", f"data.eval=[{{path: {evaluate}}}]", FP32, *extra]


FP32 = "model.dtype=float32"


@pytest.fixture(scope="session")
def sft_run(kit_model, synthetic_dir, tmp_path_factory):
    """`rlhf train sft` with configs/sft/tiny-cpu.yaml on the kit model: the run folder (hf/ inside)."""
    run = tmp_path_factory.mktemp("sft") / "run"
    rlhf(*train_args("sft", "configs/sft/tiny-cpu.yaml", kit_model["policy"], run,
                     synthetic_dir / "sft_train.jsonl", synthetic_dir / "sft_test_seen.jsonl"))
    return run


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from rlhf_system.placement.group import NO_IDLE_WORKERS

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config=NO_IDLE_WORKERS)
    yield
    ray.shutdown()


def sft_config(model_dir, data_dir, run_dir, **over) -> RunConfig:
    cfg = RunConfig(mode="sft", run_dir=str(run_dir))
    cfg.model.path, cfg.model.dtype = str(model_dir), "float32"  # equivalence runs: fp32 on every host
    cfg.data.train = [{"path": str(data_dir / "sft_train.jsonl")}]
    cfg.data.eval = [{"path": str(data_dir / "sft_test_seen.jsonl")}]
    cfg.data.max_len, cfg.data.max_prompt_len = 128, 96
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4
    cfg.optim.lr, cfg.optim.warmup_ratio = 1e-3, 0.0
    # One thread per worker in every run: 1- and N-worker equivalence runs then differ only in how the
    # batch is split (the thread count changes the order of float sums, which Adam amplifies).
    cfg.placement.threads_per_worker = 1
    cfg.logging.console = False
    cfg.checkpoint.export_hf = False
    for dotted, value in over.items():
        section, _, key = dotted.partition("__")
        setattr(getattr(cfg, section), key, value)
    return validate(RunConfig.model_validate(cfg.model_dump()))


def ppo_config(model_dir, data_dir, run_dir, **over) -> RunConfig:
    """A small PPO config on the synthetic prompts: rule reward only unless a test adds a reward model."""
    cfg = RunConfig(mode="ppo", run_dir=str(run_dir))
    cfg.model.path, cfg.model.dtype = str(model_dir), "float32"  # equivalence runs: fp32 on every host
    cfg.data.train = [{"path": str(data_dir / "rl_train.jsonl")}]
    cfg.data.eval = [{"path": str(data_dir / "rl_test_seen.jsonl")}]
    cfg.data.max_len, cfg.data.max_prompt_len = 128, 96
    cfg.train.rollout_batch_size, cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 16, 8
    cfg.train.max_steps, cfg.train.max_eval_samples = 1, 16
    cfg.rollout.n_samples_per_prompt, cfg.rollout.max_new_tokens = 2, 16
    cfg.rewards.use_model, cfg.rewards.rules = False, ["synthetic"]
    cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.scheduler = 1e-5, 0.0, "constant"
    cfg.placement.call_timeout_s = 300
    cfg.logging.console = False
    cfg.checkpoint.export_hf = False
    for dotted, value in over.items():
        section, _, key = dotted.partition("__")
        target = cfg
        for part in section.split("_") if section in ("algorithm_kl",) else [section]:
            target = getattr(target, part)
        setattr(target, key, value)
    return validate(RunConfig.model_validate(cfg.model_dump()))
