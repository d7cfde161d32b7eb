"""Export a trained model as a plain Hugging Face checkpoint that transformers and vLLM load as is.

Full-precision models are saved directly (ZeRO-3 shards gathered first, distributed/deepspeed.py).
With LoRA the adapter is saved to OUT/adapter, then merged into the base weights: for QLoRA the
4-bit base is first dequantised, so the merged model computes what the adapter model computed
(up to the 4-bit kernels' own rounding) rather than re-quantising the merged weights.

`rlhf export SRC --out OUT [--base BASE] [--base-quant Q]` (`export_checkpoint`) does the same merge
after training, outside any run: SRC is a PEFT adapter folder, a model folder or a run directory. A
trained adapter carries BASE_FILE (the base's dtype and quantisation), so an adapter copied out of its
run still merges onto the base it was trained against; --base-quant says it for adapters from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_system.config import RunConfig

BASE_FILE = "rlhf_base.json"  # next to adapter_config.json: {"dtype": ..., "quant": peft.quant as trained}


def merge_adapter(cfg: RunConfig, adapter_dir: str | Path, out: str | Path, task: str = "causal_lm") -> Path:
    """Base model (from cfg.model.path) + adapter -> merged full-precision checkpoint in `out`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_system.models.load import DTYPES, quantization_config

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    dtype = DTYPES[cfg.train_dtype()]
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
        return export_hf(engine, tokenizer, out, cfg.deepspeed.zero_stage, cfg.checkpoint.export_shard_mb * 2**20)
    export_hf(engine, None, out / "adapter", cfg.deepspeed.zero_stage)  # PeftModel saves the adapter only
    if dist.get_rank() == 0:
        import json

        base = {"dtype": cfg.train_dtype(), "quant": cfg.peft.quant.model_dump()}
        (out / "adapter" / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
        merge_adapter(cfg, out / "adapter", out, task)
        tokenizer.save_pretrained(out)
    dist.barrier()
    return out


# ------------------------------------------------------------------------------ rlhf export (CLI)
def _export_source(src: Path) -> tuple[str, Path]:
    """("adapter" | "model", folder) for an adapter folder, a model folder or a run directory (its hf/).
    An adapter wins over a model in the same folder; a run's hf/ is already merged, so it is copied."""
    from rlhf_system.config import ConfigError

    for folder in (src, src / "hf"):
        if (folder / "adapter_config.json").is_file():
            return "adapter", folder
        if (folder / "config.json").is_file():
            return "model", folder
    raise ConfigError(f"rlhf export: '{src}' holds no adapter_config.json (a LoRA adapter) or config.json "
                      "(a model), nor does its hf/. Fix: point it at an adapter folder, a model folder or a run "
                      "directory")


def _adapter_run_config(adapter: Path, base: str | None, base_quant: str | None = None) -> tuple[RunConfig, str, str]:
    """The config to merge with: the training run's config.yaml when the adapter is RUN/hf/adapter
    (base path, dtype and peft.quant as trained), else the adapter's base_model_name_or_path with the
    dtype and quantisation from its BASE_FILE (full precision without one); --base and --base-quant
    override. Returns (config, where the base came from, where its quantisation came from)."""
    import json

    from pydantic import ValidationError

    from rlhf_system.config import ConfigError, load_config

    run_yaml = adapter.parent.parent / "config.yaml"
    if run_yaml.is_file() and adapter.name == "adapter" and adapter.parent.name == "hf":
        cfg, origin = load_config(run_yaml), f"model.path in {run_yaml}"
        quant_origin = f"peft.quant in {run_yaml}"
    else:
        recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        tree: dict = {"model": {"path": recorded}}
        quant_origin = "none recorded: full precision"
        if (adapter / BASE_FILE).is_file():
            saved = json.loads((adapter / BASE_FILE).read_text())
            tree = {"model": {"path": recorded, "dtype": saved["dtype"]}, "peft": {"quant": saved["quant"]}}
            quant_origin = str(adapter / BASE_FILE)
        try:
            cfg = RunConfig.model_validate(tree)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(k) for k in err["loc"])
            raise ConfigError(f"rlhf export: {adapter / BASE_FILE}: {field}: {err['msg']}") from None
        origin = f"base_model_name_or_path in {adapter / 'adapter_config.json'}"
    if base:
        cfg.model.path, origin = base, "--base"
    if base_quant:
        cfg.peft.quant.load_in, quant_origin = base_quant, "--base-quant"
    if not cfg.model.path or not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"rlhf export: base model '{cfg.model.path}' ({origin}) not found (no config.json). "
                          "Fix: --base BASE_MODEL_DIR")
    return cfg, origin, quant_origin


def _copy_tokenizer(candidates: list[Path], out: Path) -> str | None:
    from transformers import AutoTokenizer

    for folder in candidates:
        if (folder / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(folder).save_pretrained(out)
            return str(folder)
    return None


def export_checkpoint(src: str | Path, out: str | Path, base: str | None = None,
                      base_quant: str | None = None) -> dict:
    """`rlhf export`: a plain HF checkpoint (safetensors + tokenizer) in `out` from a LoRA adapter
    (merged into its base with merge_adapter) or from a model / run folder (re-saved). Written to a
    temporary sibling and renamed, so `out` is complete or absent. Returns what was done."""
    import json
    import os
    import shutil

    from rlhf_system.config import ConfigError

    src, out = Path(src), Path(out)
    if not src.exists():
        raise ConfigError(f"rlhf export: '{src}' does not exist")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"rlhf export: --out '{out}' exists and is not empty. Fix: choose a new folder")
    kind, folder = _export_source(src)
    if kind == "model" and (base or base_quant):
        raise ConfigError(f"rlhf export: '{folder}' is a full model, not an adapter; --base and --base-quant "
                          "apply to adapters only")
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "adapter":
            cfg, origin, quant_origin = _adapter_run_config(folder, base, base_quant)
            task_type = json.loads((folder / "adapter_config.json").read_text()).get("task_type") or "CAUSAL_LM"
            task = "seq_cls" if task_type == "SEQ_CLS" else "causal_lm"
            merge_adapter(cfg, folder, tmp, task)
            tokenizer = _copy_tokenizer([folder, Path(cfg.model.tokenizer_path or cfg.model.path)], tmp)
            info = {"source": str(folder), "kind": "adapter", "base": cfg.model.path, "base_from": origin,
                    "task": task, "quant_base": cfg.peft.quant.load_in, "quant_base_from": quant_origin}
        else:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

            archs = AutoConfig.from_pretrained(folder).architectures or []
            seq_cls = any(a.endswith("ForSequenceClassification") for a in archs)
            auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
            auto.from_pretrained(folder, dtype="auto").save_pretrained(tmp, safe_serialization=True)
            tokenizer = _copy_tokenizer([folder], tmp)
            info = {"source": str(folder), "kind": "model", "task": "seq_cls" if seq_cls else "causal_lm"}
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "tokenizer_from": tokenizer, "out": str(out), "files": sorted(p.name for p in out.iterdir())}
