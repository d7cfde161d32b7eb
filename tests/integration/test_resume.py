"""Resume equivalence with a real interruption: N steps straight == k steps, stop, resume, N-k steps.

SFT, RM and DPO are killed (SIGKILL to the whole process group) as soon as the first checkpoint is
published; PPO's controller is SIGKILLed alone (GAE: no process or port may outlive it) or preempted
with SIGTERM (GRPO: it checkpoints and exits 0). The resumed run picks the latest complete checkpoint
(`checkpoint.resume=auto`) and must log the same metrics for every later step and end with the same
parameters as the straight run, within 1e-6 (CPU, fp32). The straight runs go through the same command
lines in one long-lived process (cli_host.py: no imports or Ray start-up per run); the interrupted and
resumed runs are fresh `rlhf` processes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_system.checkpoint import complete_checkpoints
from tests.integration.cli_host import CliHost

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


def resume_beside_straight(host: CliHost, straight: list[str], resumed: list[str]) -> None:
    """The resumed run (a fresh `rlhf` process) and the straight run (in the host) at the same time: two
    independent runs, each on its own Ray cluster, so that the one's idle moments are the other's."""
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(host.run, straight[3:])
        run(resumed)
        reference.result()


@pytest.fixture(scope="module")
def straight_host(tmp_path_factory):
    """The straight (uninterrupted) runs' process: `rlhf` command lines through cli.main, one after another,
    on one Ray cluster (cli_host.py), so that each pays no imports and no Ray start-up. The interrupted and
    the resumed runs are fresh `rlhf` processes, as a user's are."""
    with CliHost(tmp_path_factory.mktemp("straight-host") / "log") as host:
        yield host


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


# Streamed data (each rank reads its own share of the stream; its position is in the checkpoint): the packed
# SFT stream on two ranks, RM, and DPO, whose reference scores each streamed step instead of a precomputed
# table. Streamed runs read files with untidy extra columns (tests/untidy.py), as real data has (issue 26).
STREAMING = ("data.streaming=true", "algorithm.dpo.precompute_reference=true")
CASES = {"sft-zero2": ("sft", ("deepspeed.zero_stage=2",)), "rm-streaming": ("rm", STREAMING), "dpo": ("dpo", ()),
         "sft-streaming-2-ranks-zero3": ("sft", (*STREAMING, "placement.actor=2", "deepspeed.zero_stage=3")),
         "dpo-streaming": ("dpo", STREAMING)}


@pytest.fixture(scope="module")
def untidy_dir(synthetic_dir, tmp_path_factory):
    from tests.untidy import untidy_copy

    return untidy_copy(synthetic_dir, tmp_path_factory.mktemp("untidy"))


def data_for(extra: tuple[str, ...], synthetic_dir: Path, untidy_dir: Path) -> Path:
    return untidy_dir if "data.streaming=true" in extra else synthetic_dir
TIMING = ("time", "step_s", "tokens_per_s", "seconds")  # wall-clock metrics differ between any two runs


def assert_same_metrics(straight: Path, broken: Path, after_step: int) -> None:
    """Every metric of every step after the kill equals the straight run's (the resumed run's row is the
    last one logged for its step: the killed run may have logged a step past its checkpoint)."""
    def rows(run: Path) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
            if "resumed_from" not in r and "stopped_by" not in r:
                out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if not k.startswith(TIMING)})
        return out

    a, b = rows(straight), rows(broken)
    later = [s for s in a if s > after_step]
    assert later and set(later) <= set(b), (later, sorted(b))
    for s in later:
        assert a[s].keys() == b[s].keys(), (s, a[s].keys() ^ b[s].keys())
        for k, v in a[s].items():
            assert v == pytest.approx(b[s][k], rel=0, abs=1e-6), (s, k, v, b[s][k])


@pytest.mark.parametrize("case", list(CASES))
def test_kill_and_resume_matches_straight_run(case, straight_host, small_model, synthetic_dir, untidy_dir, tmp_path):
    mode, extra = CASES[case]
    model = small_model[MODEL_FOR[mode]]
    synthetic_dir = data_for(extra, synthetic_dir, untidy_dir)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    killed_at = kill_after_first_checkpoint(command(mode, model, synthetic_dir, broken, *extra), broken)
    assert 0 < killed_at < N_STEPS, killed_at
    assert not (broken / "hf").exists()  # it really died before finishing
    resume_beside_straight(straight_host, command(mode, model, synthetic_dir, straight, *extra),
                           command(mode, model, synthetic_dir, broken, *extra, "checkpoint.resume=auto"))

    a, b = load_file(straight / "hf" / "model.safetensors"), load_file(broken / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    logged = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert any("resumed_from" in row for row in logged)
    assert_same_metrics(straight, broken, killed_at)


# ------------------------------------------------------------------------------------------- PPO
PPO_STEPS = 3


def ppo_command(estimator: str, model: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """The shipped GAE (actor, critic, reference, vLLM engine) or GRPO config on the small model, shrunk,
    with the rule reward. A checkpoint every 2 steps; sampling seeded per step (rollout.seed + step)."""
    config = {"gae": "configs/ppo/tiny-cpu.yaml", "grpo": "configs/grpo/tiny-cpu.yaml",
              "partial": "configs/grpo/tiny-cpu.yaml"}[estimator]
    return [sys.executable, "-m", "rlhf_system.cli", "train", "ppo", "--config", config, f"model.path={model}",
            f"run_dir={run_dir}", f"train.max_steps={PPO_STEPS}", "logging.console=false", "checkpoint.save_every=2",
            f"data.train=[{{path: {data / 'rl_train.jsonl'}}}]", "data.eval=[]", "train.eval_every=0",
            "train.rollout_batch_size=8", "rollout.n_samples_per_prompt=2", "train.global_batch_size=16",
            "train.micro_batch_size=8", "rollout.max_new_tokens=16", "rewards.use_model=false",
            "rewards.rules=[synthetic]", "model.reward_path=''", "placement.call_timeout_s=240", *extra]


# GRPO also streams its prompts (the stream's position is in the run state) and adapts its KL coefficient
# (the controller's state is in the run state): both must be restored for the later steps to match. It
# runs DAPO's dynamic sampling (refills draw more prompts from the stream), overlong shaping and filtering,
# and GSPO's loss, so that those are exercised end to end too. And its rollouts run one step ahead of
# training (train.max_staleness=1): the checkpoint keeps the batches sampled ahead (pipeline.json), and
# the resumed run trains on them as the uninterrupted one did.
PPO_EXTRA = {"gae": (), "grpo": ("data.streaming=true", "algorithm.kl.adaptive=true", "algorithm.kl.target=0.01",
                                 "algorithm.kl.coef=0.1", "rollout.dynamic_sampling=true",
                                 "rollout.dynamic_sampling_max_rounds=2", "rewards.overlong_buffer=4",
                                 "algorithm.overlong_filter=true", "algorithm.policy_loss=gspo",
                                 "algorithm.clip_eps=0.0003", "algorithm.clip_eps_high=0.0004",
                                 "train.max_staleness=1", "algorithm.tis_cap=2"),
             # Partial rollouts (trainers/partial.py): the groups in flight are in the checkpoint too. No
             # reference (kl 0): this case is about the rollout side.
             "partial": ("train.max_staleness=1", "algorithm.tis_cap=2", "rollout.partial_tokens=6",
                         "algorithm.kl.coef=0", "logging.rollouts=true")}


def engine_module(ckpt: Path, role: str) -> dict:
    states = torch.load(ckpt / role / "engine" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return states["module"]


def stop_after_first_step(cmd: list[str], run_dir: Path) -> tuple[int, str]:
    """Preemption: SIGTERM once step 1 is logged. The run finishes that step, checkpoints it and exits 0
    within the deadline (one step and one save). Returns (the checkpoint's step, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and '"step": 1,' in metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no step within 600 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["stopped_by"] == "SIGTERM" and "SIGTERM received" in err
    done = complete_checkpoints(run_dir / "checkpoints")
    return json.loads((done[-1] / "run_state.json").read_text())["step"], err


def kill_controller_after_first_checkpoint(cmd: list[str], run_dir: Path) -> int:
    """SIGKILL the controller alone (not its process group): every process of the run and every port it
    listened on must be gone within 60 s (distributed/reaper.py stops what its shutdown would have)."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not complete_checkpoints(run_dir / "checkpoints"):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    tree = psutil.Process(proc.pid).children(recursive=True)
    procs = {p.pid: p.create_time() for p in tree}
    ports = {c.laddr.port for p in tree for c in _listening(p)}
    assert len(procs) >= 5 and ports, (procs, ports)  # Ray's processes, the trainers, the engine
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, [" ".join(p.cmdline())[:100] for p in alive]
    listening = {c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert not listening & ports, f"ports still listening: {listening & ports}"
    done = complete_checkpoints(run_dir / "checkpoints")
    return json.loads((done[-1] / "run_state.json").read_text())["step"]


def _listening(p) -> list:
    import psutil

    try:
        return [c for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def _alive(procs: dict[int, float]) -> list:
    import psutil

    out = []
    for pid, created in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("estimator", ["gae", "grpo", "partial"])
def test_ppo_interrupt_and_resume_matches_straight_run(estimator, straight_host, small_model, synthetic_dir,
                                                       untidy_dir, tmp_path):
    """GAE: the controller is SIGKILLed after its step-2 checkpoint and leaves no process or port behind.
    GRPO (streamed prompts, adaptive KL): it is preempted (SIGTERM) after step 1, checkpoints that step
    and exits 0. Then resume=auto:
    the later steps sample the same tokens (vLLM seeded per step, the engine reloaded from the resumed
    actor), so every metric and the final actor and critic weights equal a straight run's within 1e-6."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    model = small_model["policy"]
    extra = PPO_EXTRA[estimator]
    synthetic_dir = data_for(extra, synthetic_dir, untidy_dir)
    if estimator == "gae":
        stopped_at = kill_controller_after_first_checkpoint(
            ppo_command(estimator, model, synthetic_dir, broken, *extra), broken)
    else:
        stopped_at, _ = stop_after_first_step(ppo_command(estimator, model, synthetic_dir, broken, *extra), broken)
    if estimator == "partial":  # the checkpoint holds groups in flight, and the resumed run continues them
        kept = json.loads((complete_checkpoints(broken / "checkpoints")[0] / "pipeline.json").read_text())
        assert kept["carry"]["pool"] and kept["carry"]["next_uid"] > 8, kept["carry"]["next_uid"]
    assert 0 < stopped_at < PPO_STEPS and not (broken / "hf").exists()
    resume_beside_straight(straight_host, ppo_command(estimator, model, synthetic_dir, straight, *extra),
                           ppo_command(estimator, model, synthetic_dir, broken, *extra, "checkpoint.resume=auto"))

    assert_same_metrics(straight, broken, stopped_at)
    if estimator == "partial":  # the same samples, token for token, versions included
        dumps = [[json.loads(x) for x in (r / "rollouts.jsonl").read_text().splitlines()] for r in (straight, broken)]
        after = [[d for d in ds if d["step"] > stopped_at] for ds in dumps]
        assert after[0] and [(d["response_ids"], d["versions"]) for d in after[0]] == \
               [(d["response_ids"], d["versions"]) for d in after[1]]
    if estimator == "grpo":  # the adaptive KL coefficient moved, so its restored state is what matched
        rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
        coefs = [r.get("kl_coef") for r in rows]
        assert len({c for c in coefs if c is not None}) == PPO_STEPS, coefs
        assert all(1 <= r["dynamic_sampling/rounds"] <= 2 and "reward/overlong" in r for r in rows if "kl_coef" in r)
        assert [r["async/staleness"] for r in rows if "kl_coef" in r] == [0] + [1] * (PPO_STEPS - 1)
        kept = json.loads((complete_checkpoints(broken / "checkpoints")[0] / "pipeline.json").read_text())
        ahead = list(range(stopped_at, min(stopped_at + 2, PPO_STEPS)))  # sampled ahead, by the version before
        assert [(b["index"], b["version"]) for b in kept["batches"]] == [(i, i - 1) for i in ahead]
    a, b = load_file(straight / "hf" / "model.safetensors"), load_file(broken / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    last_a, last_b = (complete_checkpoints(r / "checkpoints")[-1] for r in (straight, broken))
    roles = ["actor", "critic"] if estimator == "gae" else ["actor"]
    assert (last_b / "critic").exists() == (estimator == "gae")
    for role in roles:
        ma, mb = engine_module(last_a, role), engine_module(last_b, role)
        assert ma.keys() == mb.keys()
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=1e-6, msg=f"{role}: {k}")
