"""Export a trained model as a plain Hugging Face checkpoint that transformers and vLLM load as is.

Full-precision models are saved directly (ZeRO-3 shards gathered first, distributed/deepspeed.py).
With LoRA the adapter is saved to OUT/adapter, then merged into the base weights: for QLoRA the
4-bit base is first dequantised, so the merged model computes what the adapter model computed
(up to the 4-bit kernels' own rounding) rather than re-quantising the merged weights.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_system.config import RunConfig


def merge_adapter(cfg: RunConfig, adapter_dir: str | Path, out: str | Path, task: str = "causal_lm") -> Path:
    """Base model (from cfg.model.path) + adapter -> merged full-precision checkpoint in `out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_system.models.load import DTYPES, quantization_config

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    dtype = DTYPES[cfg.model.resolved_dtype()]
    quant = quantization_config(cfg.peft, dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if task != "causal_lm":
        kwargs["num_labels"] = 1
    if quant is not None:
        base = auto.from_pretrained(cfg.model.path, quantization_config=quant, **kwargs).dequantize()
        base = base.to(torch.float32 if dtype == torch.float32 else dtype)
    else:
        base = auto.from_pretrained(cfg.model.path, **kwargs)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    return Path(out)


def export_model(engine, tokenizer, out: str | Path, cfg: RunConfig, task: str = "causal_lm") -> Path:
    """Collective: every rank calls it; rank 0 writes. Returns the folder transformers/vLLM load."""
    import torch.distributed as dist

    from rlhf_system.distributed.deepspeed import export_hf

    out = Path(out)
    if not cfg.peft.lora.enabled:
        return export_hf(engine, tokenizer, out, cfg.deepspeed.zero_stage)
    export_hf(engine, None, out / "adapter", cfg.deepspeed.zero_stage)  # PeftModel saves the adapter only
    if dist.get_rank() == 0:
        merge_adapter(cfg, out / "adapter", out, task)
        tokenizer.save_pretrained(out)
    dist.barrier()
    return out
