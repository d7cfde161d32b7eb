"""DPO across real Ray workers under real DeepSpeed (gloo): it learns the synthetic preferences, the
precomputed reference gives the live reference's updates, 2 ranks match 1, and the IPO / cDPO / RPO
variants run.

Tolerance for equivalence: fp32 on CPU; ranks sum gradients in another order than one rank, and the
precomputed reference scores pairs in other padded batches than the training micro-batches, so losses
and parameters may differ by float rounding only: rtol 1e-4, atol 1e-5.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_system.config import RunConfig, validate
from rlhf_system.data.batching import global_batches
from rlhf_system.placement.group import WorkerGroup
from rlhf_system.workers.dpo import DPOWorker
from tests.integration.conftest import rlhf, train_args

pytestmark = pytest.mark.integration
STEPS = 3
BETA = 0.1


def dpo_config(model_dir, data_dir, run_dir, **over) -> RunConfig:
    """Small and fast: 48 training pairs (3 steps of 8, micro 4), 12 held-out pairs."""
    cfg = RunConfig(mode="dpo", run_dir=str(run_dir))
    cfg.model.path = str(model_dir)
    cfg.data.train = [{"path": str(data_dir / "pref_train.jsonl"), "max_samples": 48}]
    # 12 = 1.5 rounds of micro 4 x 2 ranks: one rank runs a throw-away forward in evaluate.
    cfg.data.eval = [{"path": str(data_dir / "pref_test.jsonl"), "max_samples": 12}]
    cfg.data.max_len, cfg.data.max_prompt_len = 128, 96
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4
    cfg.placement.threads_per_worker = 1  # 1 vs 2 workers differ only in the split (threads reorder float sums)
    cfg.optim.lr, cfg.optim.warmup_ratio = 1e-3, 0.0
    cfg.algorithm.dpo.beta = BETA
    cfg.placement.launcher = "ray"
    cfg.logging.console = False
    cfg.checkpoint.export_hf = False
    for dotted, value in over.items():
        *path, key = dotted.split("__")
        node = cfg
        for part in path:
            node = getattr(node, part)
        setattr(node, key, value)
    return validate(RunConfig.model_validate(cfg.model_dump()))


def train(cfg, workers: int, steps: int = STEPS) -> dict:
    group = WorkerGroup("actor", DPOWorker, workers, cfg.placement)
    try:
        n = group.call("setup", cfg)[0]["train_samples"]
        batches = global_batches(n, cfg.train.global_batch_size, cfg.seed, 0)[:steps]
        metrics = [group.call("train_step", idx, step)[0] for step, idx in enumerate(batches)]
        final = group.call("evaluate")[0]
        params = group.call("full_state_dict")[0]
    finally:
        group.shutdown()
    return {"losses": [m["loss"] for m in metrics], "grad_norms": [m["grad_norm"] for m in metrics],
            "params": params, "eval": final, "batches": batches}


def assert_same(a, b):
    # Adam is blind to a constant factor on the gradient: grad norms (before clipping) pin the scale.
    for key in ("losses", "grad_norms"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert a["eval"].keys() == b["eval"].keys()
    for k in a["eval"]:  # summed log-probs are ~-40: a relative tolerance
        assert a["eval"][k] == pytest.approx(b["eval"][k], rel=1e-4, abs=1e-4), k


def plain_grad_norm(cfg, batch_idx: list[int]) -> float:
    """The first step's gradient norm from one plain forward over the whole global batch, mean over pairs."""
    from transformers import AutoModelForCausalLM

    from rlhf_system.algorithms.logprobs import shifted_logprobs
    from rlhf_system.algorithms.losses import dpo_loss, sequence_logps
    from rlhf_system.data.build import build_dataset
    from rlhf_system.models.load import load_tokenizer
    from rlhf_system.workers.dpo import collate_pairs

    tok = load_tokenizer(cfg.model)
    ds, _ = build_dataset("preference", cfg.data, cfg.data.train, tok, cfg.seed, cfg.model.path)
    batch = collate_pairs([ds[i] for i in batch_idx], tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = sequence_logps(shifted_logprobs(logits, batch["input_ids"]), batch["loss_mask"][:, 1:]).chunk(2)
    dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), BETA)[0].backward()  # reference == policy
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def test_dpo_learns_the_synthetic_preferences(kit_model, synthetic_dir, tmp_path):
    run = tmp_path / "run"
    out = rlhf(*train_args("dpo", "configs/dpo/tiny-cpu.yaml", kit_model["policy"], run,
                           synthetic_dir / "pref_train.jsonl", synthetic_dir / "pref_test.jsonl"))
    result = json.loads(out.stdout[out.stdout.index("{"):])
    before, after = result["initial"], result["final"]
    print(json.dumps({"initial": before, "final": after, "steps": result["steps"], "seconds": result["seconds"]}))
    # Policy == reference at the start: every implicit reward is 0 (ties count as wrong).
    assert before["eval_reward_accuracy"] == 0.0 and before["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    # Measured (200 held-out pairs, 100 steps): margin ~14 -> ~40 nats, accuracy ~0.8, loss 0.69 -> ~0.3.
    assert after["eval_logp_margin"] > before["eval_logp_margin"] + 10, (before, after)
    assert after["eval_reward_accuracy"] > 0.7, after
    assert after["eval_loss"] < 0.5, after
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == result["steps"] == 100
    assert {"loss", "reward_accuracy", "reward_margin", "lr", "pairs"} <= rows[1].keys()
    assert (Path(result["export"]) / "config.json").exists()


@pytest.fixture(scope="module")
def single(ray_cluster, small_model, synthetic_dir, tmp_path_factory):
    """One Ray worker, ZeRO-2, live reference: the run the others must reproduce."""
    cfg = dpo_config(small_model["policy"], synthetic_dir, tmp_path_factory.mktemp("one"))
    return train(cfg, 1)


def test_step_is_the_mean_over_the_global_batch(single, small_model, synthetic_dir, tmp_path):
    # 1 rank, 2 micro-batches of 4 pairs, gradient accumulation: the same gradient as one plain
    # forward/backward of the mean loss over all 8 pairs.
    assert single["losses"][0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert single["losses"][-1] < single["losses"][0]  # it trains at all
    cfg = dpo_config(small_model["policy"], synthetic_dir, tmp_path)
    assert single["grad_norms"][0] == pytest.approx(plain_grad_norm(cfg, single["batches"][0]), rel=1e-4)


def test_precomputed_reference_matches_live(single, small_model, synthetic_dir, tmp_path):
    cfg = dpo_config(small_model["policy"], synthetic_dir, tmp_path, algorithm__dpo__precompute_reference=True)
    assert_same(train(cfg, 1), single)


@pytest.mark.parametrize("precompute,offload", [(False, False), (True, False), (False, True)],
                         ids=["live-reference", "precomputed-reference", "offloaded-reference"])
def test_two_workers_match_one(single, small_model, synthetic_dir, tmp_path, precompute, offload):
    # The reference sharded by ZeRO-3 over the two ranks (and, offloaded, its parameters kept on the CPU
    # between forwards): its log-probs must not change. Precomputed, each rank scores its strided share
    # and the tables are combined over ranks.
    cfg = dpo_config(small_model["policy"], synthetic_dir, tmp_path, placement__actor=2, deepspeed__zero_stage=2,
                     deepspeed__frozen_zero_stage=3, deepspeed__frozen_offload=offload,
                     algorithm__dpo__precompute_reference=precompute)
    assert_same(train(cfg, 2), single)


def test_ipo_cdpo_rpo_run(single, small_model, synthetic_dir, tmp_path):
    """Step 0 has policy == reference (h = 0), so the first loss is known by hand."""
    variants = {
        "ipo": ({"algorithm__dpo__loss": "ipo"}, (1 / (2 * BETA)) ** 2),  # (h - 1/(2 beta))^2 = 25
        "cdpo": ({"algorithm__dpo__label_smoothing": 0.1}, math.log(2)),  # both terms are log 2 at h = 0
        "rpo": ({"algorithm__dpo__nll_coef": 1.0}, None),                 # log 2 + chosen NLL per token
    }
    group = WorkerGroup("actor", DPOWorker, 1, dpo_config(small_model["policy"], synthetic_dir, tmp_path).placement)
    try:
        for name, (over, first) in variants.items():
            cfg = dpo_config(small_model["policy"], synthetic_dir, tmp_path / name, **over)
            n = group.call("setup", cfg)[0]["train_samples"]
            batches = global_batches(n, cfg.train.global_batch_size, cfg.seed, 0)[:2]
            losses = [group.call("train_step", idx, step)[0]["loss"] for step, idx in enumerate(batches)]
            assert all(math.isfinite(x) for x in losses), (name, losses)
            if first is not None:
                assert losses[0] == pytest.approx(first, rel=1e-5), name
            else:  # a random-init model: the NLL per token is about log(vocab) = log(1024) ~ 6.9
                assert 3 < losses[0] - math.log(2) < 10, (name, losses)
            assert losses != pytest.approx(single["losses"][:2]), name  # not the sigmoid run's losses
    finally:
        group.shutdown()
