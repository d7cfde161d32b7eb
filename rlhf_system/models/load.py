"""Loading Hugging Face models and tokenizers for a role, with clear errors before anything starts.

Only local folders are loaded in tests and CI (HF_HUB_OFFLINE=1); a hub id works on machines that
allow it. `peft.quant` loads the base in 4-bit NF4 / FP4 or 8-bit through bitsandbytes; `peft.lora`
wraps the model with LoRA adapters (QLoRA = both). `check_lora_targets` runs on an empty (meta)
model so a target module that does not exist is an error before any worker or weight loads.
Frozen, inference-only models (evaluation, the PPO reference and reward roles) load quantised through
`frozen_quantization`: the same bitsandbytes configs, without the k-bit training preparation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_system.config import ConfigError, ModelConfig, PeftConfig, QuantConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(path: str, field: str) -> str:
    """A local folder must hold a config.json; anything else that is not a hub id is an error."""
    p = Path(path)
    looks_local = path.startswith((".", "/", "~")) or p.exists() or path.count("/") != 1
    if not path or (looks_local and not (p / "config.json").exists()):
        raise ConfigError(f"{field}: '{path}' is not a model folder (no config.json). "
                          "Fix: point it at a saved model (rlhf make-tiny-model OUT makes one)")
    return path


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model(path: str, field: str, allow_pickle: bool = False) -> str:
    """check_model_path, and a local folder holds weights we load: safetensors, or pickled weights
    only with model.allow_pickle=true (unpickling a file can run any code in it)."""
    check_model_path(path, field)
    p = Path(path)
    if not p.is_dir():
        return path  # a hub id: from_pretrained(use_safetensors=...) enforces the same rule
    if any(p.glob("*.safetensors")):
        return path
    pickled = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise ConfigError(f"{field}: '{path}' has a config.json but no weights (*.safetensors). Fix: point it at "
                          "a complete saved model")
    if not allow_pickle:
        raise ConfigError(f"{field}: '{path}' holds pickled weights ({', '.join(pickled[:3])}), which can run code "
                          "when loaded; only safetensors load by default. Fix: re-save it with save_pretrained("
                          "safe_serialization=True), or set model.allow_pickle=true if you trust the file")
    return path


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = check_model_path(cfg.tokenizer_path or cfg.path, "model.tokenizer_path" if cfg.tokenizer_path else "model.path")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # many base tokenizers ship without one
    return tok


def quantization_config(peft: PeftConfig, dtype: torch.dtype):
    """bitsandbytes config for `peft.quant.load_in`, or None for full precision."""
    from transformers import BitsAndBytesConfig

    q = peft.quant
    if q.load_in == "none":
        return None
    if q.load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if q.compute_dtype == "auto" else DTYPES[q.compute_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute)


def check_bitsandbytes(load_in: str, field: str) -> None:
    """bitsandbytes imports and quantises a small tensor on this machine's device, or a one-line
    ConfigError naming `field`: before any model loads, rather than deep inside from_pretrained."""
    if load_in == "none":
        return
    try:
        import bitsandbytes.functional as bnb_f

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if load_in == "4bit":
            bnb_f.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
        else:
            bnb_f.int8_vectorwise_quant(torch.ones(4, 64, dtype=torch.float16, device=device))
    except Exception as e:  # ImportError, a missing native library, an unsupported device: all one answer
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ConfigError(f"{field}={load_in} needs bitsandbytes, which cannot quantise on this machine "
                          f"({reason}). Fix: install bitsandbytes>=0.48 (CPU or CUDA build), or {field}=none") from None


def frozen_quantization(load_in: str, dtype: torch.dtype, field: str = "quant"):
    """bitsandbytes config for a frozen, inference-only model, or None for "none": 4bit is NF4 with
    double quantisation computing in `dtype`, 8bit is LLM.int8 (peft.quant's defaults)."""
    if load_in == "none":
        return None
    check_bitsandbytes(load_in, field)
    return quantization_config(PeftConfig(quant=QuantConfig(load_in=load_in)), dtype)


def param_bytes(model) -> int:
    """Bytes held by the parameters as stored (packed 4-bit weights count as their uint8 storage)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def linear_names(model) -> list[str]:
    """The last name component of every linear layer: what peft.lora.target_modules matches."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_lora_targets(cfg: ModelConfig, peft: PeftConfig, path: str | None = None) -> None:
    """Every `peft.lora.target_modules` entry must name modules of the model (checked on meta tensors)."""
    if not peft.lora.enabled:
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(check_model_path(path or cfg.path, "model.path"),
                                        trust_remote_code=cfg.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in peft.lora.target_modules if t not in leaves]
    if missing:
        raise ConfigError(f"peft.lora.target_modules: {missing} not found in {config.model_type} model "
                          f"'{path or cfg.path}'. Fix: choose from its linear layers: {linear_names(model)}")


def apply_peft(model, peft: PeftConfig, task_type: str, gradient_checkpointing: bool):
    """Prepare a k-bit base for training and wrap it with LoRA adapters, as configured."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if peft.quant.load_in != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if peft.lora.enabled:
        lora = peft.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules), task_type=task_type))
    return model


def check_dtype_supported(dtype: str) -> None:
    """fp16 needs an accelerator with fp16 kernels (DeepSpeed would stop with a traceback later, CPUs
    without AVX-512 FP16 among them); checked on the worker, whose device is the one that matters."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if dtype == "float16" and not acc.is_fp16_supported():
        raise ConfigError(f"model.dtype=float16 is not supported on this worker's device ({acc.device_name()}). "
                          "Fix: model.dtype=bfloat16 or float32 (auto picks bfloat16 on GPU and bf16-capable CPUs, else float32)")


def load_pretrained(auto_class, cfg: ModelConfig, path: str, task_type: str, peft: PeftConfig | None = None,
                    frozen_quant: str = "none", configure=None, **kwargs):
    """`auto_class.from_pretrained(path)` as our config asks: dtype, attention, quantisation (peft.quant
    to train with adapters, or `frozen_quant` none|4bit|8bit for a model that is only run), gradient
    checkpointing, then LoRA adapters of `task_type`. `configure(model)` runs before the adapters wrap it."""
    if peft is not None and frozen_quant != "none":
        raise ValueError("frozen_quant is for models without peft; use peft.quant to train one")
    check_dtype_supported(cfg.resolved_dtype())
    dtype = DTYPES[cfg.resolved_dtype()]
    # use_safetensors=True: never unpickle weights unless model.allow_pickle (check_model says why).
    kwargs |= {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code,
               "use_safetensors": None if cfg.allow_pickle else True}
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    quant = quantization_config(peft, dtype) if peft else frozen_quantization(frozen_quant, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = auto_class.from_pretrained(path, **kwargs)
    if configure is not None:
        configure(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if peft is not None and (peft.lora.enabled or quant is not None):
        model = apply_peft(model, peft, task_type, cfg.gradient_checkpointing)
    return model


def load_causal_lm(cfg: ModelConfig, path: str | None = None, peft: PeftConfig | None = None,
                   frozen_quant: str = "none"):
    """A causal LM for training or inference: full precision, or quantised and/or with LoRA adapters."""
    from transformers import AutoModelForCausalLM

    path = check_model_path(path or cfg.path, "model.path")
    return load_pretrained(AutoModelForCausalLM, cfg, path, "CAUSAL_LM", peft, frozen_quant)


# algorithm.rm.head -> the architecture suffix its checkpoint must have (a mismatch is an error:
# a classifier head silently re-initialised, or a trained one kept as a "fresh" value head, is a bug).
HEAD_ARCHITECTURE = {"classifier": "ForSequenceClassification", "value_head": "ForCausalLM"}


def check_head(cfg: ModelConfig, head: str, path: str | None = None) -> str:
    """The checkpoint at `path` (default model.path) fits algorithm.rm.head; returns the path."""
    from transformers import AutoConfig

    path = check_model_path(path or cfg.path, "model.path")
    archs = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code).architectures or []
    want = HEAD_ARCHITECTURE[head]
    if archs and not any(a.endswith(want) for a in archs):
        fits = [h for h, suffix in HEAD_ARCHITECTURE.items() if any(a.endswith(suffix) for a in archs)]
        fix = f"algorithm.rm.head={fits[0]}" if fits else f"point model.path at a *{want} checkpoint"
        raise ConfigError(f"algorithm.rm.head={head} needs a *{want} checkpoint, but model.path '{path}' is "
                          f"{archs}. Fix: {fix}")
    return path


def load_reward_model(cfg: ModelConfig, head: str, pad_token_id: int, path: str | None = None,
                      peft: PeftConfig | None = None, frozen_quant: str = "none"):
    """A one-label sequence classifier, with adapters if
    `peft` asks for them; `frozen_quant` (none|4bit|8bit) quantises one that is only run (no peft).

    Heads (algorithm.rm.head): "classifier" loads a *ForSequenceClassification checkpoint as it is;
    "value_head" loads a causal LM through AutoModelForSequenceClassification, which keeps the
    backbone, drops the LM head and initialises a fresh linear `score` head (hidden -> 1)."""
    from transformers import AutoModelForSequenceClassification

    def set_pad(model):
        # The score is read at the rightmost token that is not pad_token_id (without one, HF refuses
        # batches of more than one row). Where the tokenizer pads with EOS (load_tokenizer's fallback), a
        # trailing EOS counts as padding too: the score then sits on the token before it, for every row alike.
        model.config.pad_token_id = pad_token_id

    return load_pretrained(AutoModelForSequenceClassification, cfg, check_head(cfg, head, path), "SEQ_CLS",
                           peft, frozen_quant, configure=set_pad, num_labels=1)
