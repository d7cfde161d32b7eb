"""The model families users bring (models/families.py), as tiny models, against the real engine:
`rlhf check-model` on each (vLLM's CPU build loads it, its log-probs equal transformers', a GRPO step on
the engine's samples, weight sync parity, export), and the MoE through the whole weight-sync path
(a DeepSpeed ZeRO-3 actor on Ray -> a vLLM engine, then the ZeRO-3 sharded export), where transformers
5's fused expert tensors must go out under their checkpoint names."""

import json
import subprocess
import sys

import pytest
import torch

from rlhf_system.models.families import FAMILIES
from tests.integration.conftest import REPO, ppo_config, rlhf, train_args

TOL = 1e-4
SFT = "test_sft_runs_on_a_family_through_the_trainer"


@pytest.fixture(scope="module", autouse=True)
def gemma3_sft(request, family_models, synthetic_dir, tmp_path_factory):
    """`rlhf train sft` on the tiny Gemma-3 (the SFT test's run), started with the module when that test is
    selected, so that it runs beside the in-process checks (they leave about half of 2 cores idle); the
    test then waits for it. Yields (process, run folder, log folder)."""
    if not any(item.name == SFT for item in request.session.items):
        yield None
        return
    tmp = tmp_path_factory.mktemp("gemma3-sft")
    run = tmp / "sft"
    cmd = [sys.executable, "-m", "rlhf_system.cli",
           *train_args("sft", "configs/sft/tiny-cpu.yaml", family_models["gemma3"]["policy"], run,
                       synthetic_dir / "sft_train.jsonl", synthetic_dir / "sft_test_seen.jsonl", "train.max_steps=6",
                       "placement.actor=2", "train.eval_every=0", "train.max_eval_samples=32")]
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:  # files: no pipe to fill up
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    yield proc, run, tmp
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_check_model_passes_on_every_family(family_models, name):
    """In-process for speed; one family through the command itself, as a user runs it."""
    if name == "llama3":
        out = rlhf("check-model", str(family_models[name]["policy"]))
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert "[check-model] ok   sync" in out.stderr
    else:
        from rlhf_system.model_check.report import check_model

        report = check_model(str(family_models[name]["policy"]))
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    assert checks["parity"]["gap"] <= TOL and checks["sync"]["gap"] <= TOL < checks["sync"]["gap_before"]
    assert checks["grpo"]["mismatch"] <= TOL and checks["grpo"]["layouts"] <= TOL
    assert checks["grpo"]["objective"][1] > checks["grpo"]["objective"][0]
    assert checks["export"]["ok"]


def test_moe_weights_reach_the_engine_through_the_sync_and_the_zero3_export(ray_cluster, family_models,
                                                                             synthetic_dir, tmp_path):
    """Qwen2-MoE: a ZeRO-3 actor takes PPO updates, the weight sync (gloo, small buckets) carries its
    fused experts out as the checkpoint's per-expert tensors, and the engine then scores like the actor;
    the sharded ZeRO-3 export loads in transformers and generates what vLLM generates."""
    from transformers import AutoModelForCausalLM

    from rlhf_system.data.experience import Experience
    from rlhf_system.distributed.weight_sync import WeightSync
    from rlhf_system.models.generate import hf_generate
    from rlhf_system.models.load import load_tokenizer
    from rlhf_system.placement.roles import start_roles, stop_roles
    from rlhf_system.workers.actor import ActorWorker
    from rlhf_system.workers.rollout import RolloutGroup

    cfg = ppo_config(family_models["qwen2_moe"]["policy"], synthetic_dir, tmp_path, optim__lr=3e-3, deepspeed__zero_stage=3,
                     rollout__sync_bucket_mb=0.25)
    tok = load_tokenizer(cfg.model)
    prompt_ids = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                  for q in ("What is 3 + 4?", "Name a colour.", "Count to three.", "Say hello.")]
    engine = RolloutGroup(cfg, cfg.model.path)
    groups, shared = start_roles(cfg, {"actor": ActorWorker})
    sync = None
    try:
        actor = groups["actor"]
        actor.call("setup", cfg, 10)
        sync = WeightSync(actor, engine, timeout_s=120, backend="gloo")
        sync.open()
        names = [m.name for b in sync.plan for m in b]
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
        assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
        gen = engine.generate(prompt_ids, n=2, temperature=1.0, seed=1)
        prompts = [prompt_ids[i // 2] for i in range(len(gen))]
        samples = Experience.from_rollout(prompts, [g.response_ids for g in gen], tok.pad_token_id)
        g = torch.Generator().manual_seed(0)
        for step in range(2):
            old = actor.call_sharded("logprobs", samples)
            signs = torch.randint(0, 2, (len(samples), 1), generator=g).float() * 2 - 1
            actor.call_sharded("update", samples.with_fields(old_logprobs=old, rollout_logprobs=old,
                                                             advantages=signs * samples.response_mask), step, 0.0)
        lens = samples.response_lens.tolist()
        trained = [row[:n] for row, n in zip(actor.call_sharded("logprobs", samples).tolist(), lens)]

        def gap() -> float:
            scored = engine.call("score_sequences", prompts, [g.response_ids for g in gen])[0]
            return max(abs(a - b) for x, y in zip(scored, trained) for a, b in zip(x, y))

        assert gap() > 1e-2, "the updates did not move the weights: the test proves nothing"
        sync.sync()
        assert gap() < TOL
        out = tmp_path / "hf"
        actor.call("save_hf", str(out))
        from safetensors import safe_open

        saved = [k for f in out.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
        assert "model.layers.1.mlp.experts.0.gate_proj.weight" in saved  # the checkpoint's names, which vLLM loads
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in saved)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        hf = hf_generate(model, tok, prompt_ids, max_new_tokens=12)
        assert [x.response_ids for x in engine.generate(prompt_ids, n=1, temperature=0.0, max_new_tokens=12)] == hf
    finally:
        if sync is not None:
            sync.close()
        stop_roles(groups, shared)
        engine.shutdown()


def test_sft_runs_on_a_family_through_the_trainer(gemma3_sft):
    """`rlhf train sft` (Ray, DeepSpeed ZeRO-2, two workers) on a tiny Gemma-3, whose template folds the
    system prompt into the first user turn: the loss falls over the steps and the export loads. The run
    is the gemma3_sft fixture's."""
    from transformers import AutoModelForCausalLM

    proc, run, logs = gemma3_sft
    proc.wait(timeout=900)
    assert proc.returncode == 0, (logs / "stderr").read_text()[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert AutoModelForCausalLM.from_pretrained(run / "hf").config.architectures == ["Gemma3ForCausalLM"]
