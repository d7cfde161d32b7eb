"""LoRA and QLoRA (4-bit NF4 base) SFT through the CLI: both train, the merged export loads, and it
gives the adapter model's logits. Also 8-bit loading, and a wrong target module failing early."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def train_sft(model, data, run_dir, *extra):
    cmd = [sys.executable, "-m", "rlhf_system.cli", "train", "sft", "--config", "configs/sft/tiny-cpu.yaml",
           f"model.path={model}", f"run_dir={run_dir}", "train.max_steps=12", "logging.console=false",
           "optim.lr=5e-3", "train.max_eval_samples=64", "peft.lora.enabled=true", "peft.lora.r=8",
           f"data.train=[{{path: {data / 'sft_train.jsonl'}}}]", f"data.eval=[{{path: {data / 'sft_test_seen.jsonl'}}}]",
           *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("quant,atol", [("none", 1e-4), ("4bit", 2e-2)])
def test_lora_and_qlora_train_and_merge(quant, atol, small_model, family_models, synthetic_dir, tmp_path):
    """LoRA on the Qwen2.5 family model (its chat template and attention biases: the family's `rlhf train`
    run), QLoRA on the kit's small model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_system.config import PeftConfig
    from rlhf_system.models.load import quantization_config

    if quant == "none":
        small_model = family_models["qwen2.5"]
    out = train_sft(small_model["policy"], synthetic_dir, tmp_path / "run", f"peft.quant.load_in={quant}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["final"]["eval_loss"] < result["initial"]["eval_loss"] - 0.3, result

    export = tmp_path / "run" / "hf"
    merged = AutoModelForCausalLM.from_pretrained(export)  # a plain checkpoint: no peft needed to load it
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base_kwargs = {"dtype": torch.float32}
    if quant != "none":
        base_kwargs["quantization_config"] = quantization_config(PeftConfig(quant={"load_in": quant}), torch.float32)
    base = AutoModelForCausalLM.from_pretrained(small_model["policy"], **base_kwargs)
    adapter = PeftModel.from_pretrained(base, export / "adapter")
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    got, want = logits_of(merged, ids), logits_of(adapter, ids)
    untrained = logits_of(AutoModelForCausalLM.from_pretrained(small_model["policy"]), ids)
    assert (want - untrained).abs().max() > 10 * atol  # the adapter changed the model: not a vacuous match
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    if quant != "none":
        check_moved_qlora_adapter_merges_onto_its_quantised_base(export, merged, ids, tmp_path)


def check_moved_qlora_adapter_merges_onto_its_quantised_base(export, merged, ids, tmp_path):
    """An adapter copied out of its run (no config.yaml beside it) still merges onto the dequantised
    4-bit base it was trained against (its rlhf_base.json says so), giving the run's own merged model;
    `--base-quant none` merges onto the full-precision base instead, which is a different model."""
    import shutil

    from transformers import AutoModelForCausalLM

    from rlhf_system.models.export import export_checkpoint

    shutil.copytree(export / "adapter", tmp_path / "moved")
    info = export_checkpoint(tmp_path / "moved", tmp_path / "m_quant")
    assert info["quant_base"] == "4bit" and info["quant_base_from"].endswith("rlhf_base.json"), info
    run_merged = logits_of(merged, ids)
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "m_quant"), ids),
                               run_merged, rtol=0, atol=1e-5)
    info = export_checkpoint(tmp_path / "moved", tmp_path / "m_full", base_quant="none")
    assert info["quant_base"] == "none" and info["quant_base_from"] == "--base-quant"
    full = logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "m_full"), ids)
    assert (full - run_merged).abs().max() > 1e-2, (full - run_merged).abs().max()


def test_unknown_lora_target_fails_before_workers(small_model, synthetic_dir, tmp_path):
    out = train_sft(small_model["policy"], synthetic_dir, tmp_path / "run", "peft.lora.target_modules=[q_proj,qkv]")
    assert out.returncode == 2
    assert "peft.lora.target_modules: ['qkv'] not found in llama model" in out.stderr
    assert "q_proj" in out.stderr and not (tmp_path / "run" / "config.yaml").exists()


def test_8bit_loading_runs_a_forward(small_model):
    from rlhf_system.config import ModelConfig, PeftConfig
    from rlhf_system.models.load import load_causal_lm

    peft = PeftConfig(quant={"load_in": "8bit"})
    model = load_causal_lm(ModelConfig(path=str(small_model["policy"])), peft=peft)
    full = load_causal_lm(ModelConfig(path=str(small_model["policy"])))
    ids = torch.randint(5, 500, (1, 16), generator=torch.Generator().manual_seed(1))
    q, f = logits_of(model, ids), logits_of(full, ids)
    assert torch.isfinite(q).all()
    assert (q - f).abs().mean() < 0.1 * f.abs().mean()  # close to full precision, not identical
