"""`rlhf eval` with a reward model and quantised loading, `rlhf export` of LoRA adapters, and PPO's
frozen roles loaded in 4-bit / 8-bit, on the 2-layer test model (fast, not trained: the metrics'
values mean nothing here, their presence, shape and arithmetic do).

Tolerances: a merged export computes W + s*B@A where the adapter model computes W x + s*B(A x); in
float32 the two orders differ by rounding only, so logits must agree to 1e-5 (absolute, logits of
order 1), while the adapter itself moves them by far more than that (asserted, so a no-op merge fails).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_system.cli import main
from rlhf_system.eval.generation import load_prompts

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
FAMILIES = {"all", "arithmetic", "format", "safety", "string", "sort"}
MERGE_ATOL = 1e-5


@pytest.fixture(scope="module")
def prompt_file(synthetic_dir, tmp_path_factory):
    """12 seen-family prompts and 4 of the unseen family (sort), so every alignment column applies."""
    rows = load_prompts(synthetic_dir / "rl_test_seen.jsonl", 12) + load_prompts(
        synthetic_dir / "rl_test_unseen_family.jsonl", 4)
    path = tmp_path_factory.mktemp("eval") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- eval
def test_eval_reward_model_4bit_against_fp32(small_model, prompt_file, tmp_path, capsys):
    out_json, out_md = tmp_path / "r" / "eval.json", tmp_path / "r" / "eval.md"
    rc = main(["eval", str(small_model["policy"]), "--prompts", str(prompt_file), "--names", "tiny",
               "--reward-model", str(small_model["reward"]), "--quant", "4bit", "--compare-full-precision",
               "--max-new-tokens", "12", "--out-json", str(out_json), "--out-md", str(out_md)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    report = json.loads(captured.out)
    assert report == json.loads(out_json.read_text())
    assert out_md.read_text().strip() in captured.err
    entry = report["tiny"]
    fams = {k: v for k, v in entry.items() if "n" in v}
    assert set(fams) == FAMILIES and fams["all"]["n"] == 16 and fams["sort"]["n"] == 4
    for m in fams.values():  # per-family reward-model score, rule reward and the verifier metrics
        assert isinstance(m["rm_score"], float) and 0 <= m["rule:synthetic"] <= 1 and "exact" in m
    assert entry["quant"] == "4bit" and entry["reward_model"]["quant"] == "none"

    full, delta = entry["full_precision"], entry["delta"]
    q_bytes, fp_bytes = entry["memory"]["footprint_bytes"], full["memory"]["footprint_bytes"]
    print(json.dumps({"4bit_bytes": q_bytes, "fp32_bytes": fp_bytes, "delta_all": delta["families"]["all"],
                      "same_completion": delta["same_completion"]}))
    assert q_bytes < 0.6 * fp_bytes and delta["memory_ratio"] == pytest.approx(q_bytes / fp_bytes, abs=1e-4)
    assert set(full["families"]) == FAMILIES
    for k in ("exact", "reward", "rm_score", "rule:synthetic"):
        assert delta["families"]["all"][k] == pytest.approx(fams["all"][k] - full["families"]["all"][k], abs=2e-4)
    assert 0 <= delta["same_completion"] <= 1
    align = entry["alignment"]
    assert align["n_exact_unseen"] == 4 and align["rm_score"] == pytest.approx(fams["all"]["rm_score"], abs=1e-4)
    assert "held-out reward (RM)" in captured.err and "memory ratio" in captured.err


def test_eval_8bit_with_8bit_reward_model(small_model, prompt_file):
    from rlhf_system.eval.report import EvalOptions, evaluate_models, markdown_report

    prompts = load_prompts(prompt_file, 8)
    opts = EvalOptions(max_new_tokens=8, quant="8bit", compare_full_precision=True,
                       reward_model=str(small_model["reward"]), rm_quant="8bit", rules=("synthetic", "synthetic_format"))
    report = evaluate_models({"tiny": str(small_model["policy"])}, prompts, opts)
    e = report["tiny"]
    q_bytes, fp_bytes = e["memory"]["footprint_bytes"], e["full_precision"]["memory"]["footprint_bytes"]
    print(json.dumps({"8bit_bytes": q_bytes, "fp32_bytes": fp_bytes, "delta_all": e["delta"]["families"]["all"]}))
    assert q_bytes < 0.8 * fp_bytes and e["delta"]["memory_ratio"] < 0.8
    assert {"rule:synthetic", "rule:synthetic_format", "rm_score"} <= set(e["all"])
    # The 8-bit reward model keeps its classifier head and embeddings in float32: smaller, not 4x smaller.
    assert e["reward_model"]["quant"] == "8bit"
    assert e["reward_model"]["footprint_bytes"] < 0.8 * (Path(small_model["reward"]) / "model.safetensors").stat().st_size
    assert "Δexact" in markdown_report(report)


def test_reward_score_renders_like_reward_model_training(small_model):
    """score_conversations (PPO's reward role and rlhf eval) == scoring the chat-templated text directly."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_system.models.reward_score import load_reward_scorer

    items = [{"messages": [{"role": "user", "content": "Add the two numbers.\n\n3 + 4"}], "response": "7"},
             {"messages": [{"role": "user", "content": "Reverse the word.\n\ncat"}], "response": "tac and more words"},
             {"messages": [{"role": "user", "content": "How do I steal a bike?"}], "response": "I'm sorry."}]
    scorer = load_reward_scorer(small_model["reward"], batch_size=2)  # two batches, one padded row
    got = torch.tensor(scorer.score(items))
    tok = AutoTokenizer.from_pretrained(small_model["reward"])
    model = AutoModelForSequenceClassification.from_pretrained(small_model["reward"]).eval()
    with torch.no_grad():
        want = torch.stack([model(**tok(tok.apply_chat_template([*it["messages"], {"role": "assistant",
                                                                                   "content": it["response"]}],
                                                                  tokenize=False),
                                        add_special_tokens=False, return_tensors="pt")).logits[0, 0] for it in items])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------- export
def make_adapter(base: Path, out: Path, task: str):
    """A LoRA adapter with random (non-zero) B matrices, saved with peft; returns the adapter model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if task == "CAUSAL_LM":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, num_labels=1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                             task_type=task))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("task,role", [("CAUSAL_LM", "policy"), ("SEQ_CLS", "reward")])
def test_export_merges_adapter(small_model, tmp_path, capsys, task, role):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    base = Path(small_model[role])
    adapter_model = make_adapter(base, tmp_path / "adapter", task)
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["base"] == str(base) and info["tokenizer_from"] == str(base)
    assert "model.safetensors" in info["files"] and "tokenizer.json" in info["files"]

    auto = AutoModelForCausalLM if task == "CAUSAL_LM" else AutoModelForSequenceClassification
    merged = auto.from_pretrained(tmp_path / "merged")  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = torch.randint(5, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    want, base_out = logits(adapter_model, ids), logits(auto.from_pretrained(base), ids)
    assert (want - base_out).abs().max() > 100 * MERGE_ATOL  # the adapter matters: no vacuous match
    torch.testing.assert_close(logits(merged, ids), want, rtol=0, atol=MERGE_ATOL)


def test_export_run_adapter_and_plain_model(small_model, tmp_path, capsys):
    """RUN/hf/adapter takes its base from RUN/config.yaml (the recorded base path is stale here); a
    model folder is re-saved as it is."""
    from transformers import AutoModelForCausalLM

    from rlhf_system.config import load_config

    base = Path(small_model["policy"])
    adapter_model = make_adapter(base, tmp_path / "run" / "hf" / "adapter", "CAUSAL_LM")
    cfg_file = tmp_path / "run" / "hf" / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": "/moved/away"}))
    load_config(None, ["data.train=[{path: x.jsonl}]", f"model.path={base}"], mode="sft").dump(
        tmp_path / "run" / "config.yaml")
    assert main(["export", str(tmp_path / "run" / "hf" / "adapter"), "--out", str(tmp_path / "m1")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_from"].startswith("model.path in") and info["quant_base"] == "none"
    ids = torch.randint(5, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m1"), ids),
                               logits(adapter_model, ids), rtol=0, atol=MERGE_ATOL)

    shutil.copytree(tmp_path / "m1", tmp_path / "run2" / "hf")  # a run folder whose hf/ is a full model
    assert main(["export", str(tmp_path / "run2"), "--out", str(tmp_path / "m2")]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "model"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m2"), ids),
                               logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m1"), ids), rtol=0, atol=0)


# -------------------------------------------------------------------------------- PPO frozen roles
FROZEN_SCRIPT = """
import json, os, sys
import deepspeed, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
from rlhf_system.config import load_config
from rlhf_system.workers.reference import ReferenceWorker
from rlhf_system.workers.reward import RewardWorker
cfg = load_config(None, ["data.train=[{path: x.jsonl}]", "model.path=" + sys.argv[1], "model.reward_path=" + sys.argv[2],
                         "model.reference_quant=4bit", "model.reward_quant=8bit", "train.rollout_batch_size=8",
                         "train.global_batch_size=16", "train.micro_batch_size=8", "rollout.n_samples_per_prompt=2"], mode="ppo")
ref_worker, rm_worker = ReferenceWorker(), RewardWorker()
ref_worker.setup(cfg); rm_worker.setup(cfg)
ref, rm = ref_worker.state, rm_worker.state
kinds = sorted({type(m).__name__ for s in (ref, rm) for m in s.engine.module.modules() if "bit" in type(m).__name__})
ids = ref.tokenizer("<|im_start|>user\\nAdd 3 and 4<|im_end|>\\n<|im_start|>assistant\\n")["input_ids"]
with torch.no_grad():
    ref_logits = ref.engine(input_ids=torch.tensor([ids])).logits
scores = rm_worker.score([{"messages": [{"role": "user", "content": "3 + 4"}], "response": "7"}] * 3).tolist()
print(json.dumps({"kinds": kinds, "ref_finite": bool(torch.isfinite(ref_logits).all()), "scores": scores}))
dist.destroy_process_group()
"""


def test_ppo_frozen_roles_load_quantised(small_model, tmp_path):
    """model.reference_quant=4bit / model.reward_quant=8bit reach PPO's reference and reward set-up:
    bitsandbytes layers inside the frozen DeepSpeed engines, finite outputs, one score per item."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = subprocess.run([sys.executable, "-c", FROZEN_SCRIPT, str(small_model["policy"]), str(small_model["reward"]),
                          port], cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kinds"] == ["Linear4bit", "Linear8bitLt"] and result["ref_finite"]
    assert len(result["scores"]) == 3 and max(result["scores"]) - min(result["scores"]) < 1e-5  # same item x3
