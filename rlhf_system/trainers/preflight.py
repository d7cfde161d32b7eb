"""The model checks every trainer's `prepare` makes on the driver, before any worker starts.

`preflight_model(cfg)` reads only what a model folder holds without its weights (config.json, the
safetensors headers; a model built on the meta device) and what this environment has installed, so an
8B or 13B run is refused in seconds, here, rather than after the cluster has started and loaded it.
Per mode: every model path the run loads (policy; DPO's reference; PPO's reward, critic and reference)
holds weights we load; LoRA targets exist; RM: the checkpoint fits algorithm.rm.head; DPO: a separate
reference shares the policy's vocabulary; PPO: a weight-sync bucket the user set holds the largest
tensor; every mode: flash_attention_2 has flash-attn installed. Checks of data, tokenizer templates,
environments and rewards stay in each trainer.
"""

from __future__ import annotations

import importlib.util

from rlhf_system.config import ConfigError, RunConfig
from rlhf_system.models.load import DTYPES, check_head, check_lora_targets, check_model


def preflight_model(cfg: RunConfig) -> None:
    """Raise a one-line ConfigError (the field and the fix) for the first model problem of this run."""
    m = cfg.model
    check_attention(cfg)
    check_model(m.path, "model.path", m.allow_pickle)
    if cfg.mode == "rm":
        check_head(m, cfg.algorithm.rm.head)
    if cfg.mode == "dpo":
        check_dpo_reference(cfg)
    check_lora_targets(m, cfg.peft)
    if cfg.mode == "ppo":
        check_sync_bucket(cfg)
        if cfg.rewards.use_model:
            check_model(m.reward_path, "model.reward_path", m.allow_pickle)
        for field_name in ("critic_path", "reference_path"):
            if getattr(m, field_name):
                check_model(getattr(m, field_name), f"model.{field_name}", m.allow_pickle)
        if cfg.algorithm.estimator == "opd":
            check_teacher_tokenizer(cfg)


def check_attention(cfg: RunConfig) -> None:
    """flash_attention_2 needs the flash-attn package, which the `gpu` extra does not install (it builds
    against the installed torch: docker/Dockerfile.gpu, or pyproject's gpu-flash extra). The driver's
    environment stands for the workers': the image and the venv are the same on every node."""
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs flash-attn, which is not installed. "
                          "Fix: pip install flash-attn --no-build-isolation (or the gpu-flash extra), "
                          "or model.attn_implementation=sdpa")


def check_dpo_reference(cfg: RunConfig) -> None:
    from transformers import AutoConfig

    from rlhf_system.workers.dpo import reference_path

    m = cfg.model
    check_model(reference_path(cfg), "model.reference_path" if m.reference_path else "model.path", m.allow_pickle)
    if m.reference_path:
        # Log-probs of the same token ids are only comparable over the same vocabulary.
        vocab = [AutoConfig.from_pretrained(p, trust_remote_code=m.trust_remote_code).vocab_size
                 for p in (m.path, m.reference_path)]
        if vocab[0] != vocab[1]:
            raise ConfigError(f"model.reference_path: vocabulary of {vocab[1]} tokens, but the policy "
                              f"(model.path) has {vocab[0]}. Fix: use a reference with the policy's tokenizer")


def check_teacher_tokenizer(cfg: RunConfig) -> None:
    """On-policy distillation scores the student's token ids with the teacher, so both must read text
    the same way. Compared as vocabularies, not as config.vocab_size: models of one family often pad
    their embeddings to different sizes (Qwen2.5-7B 152064, 1.5B 151936) over the same tokenizer."""
    from transformers import AutoTokenizer

    m = cfg.model
    student, teacher = (AutoTokenizer.from_pretrained(p, trust_remote_code=m.trust_remote_code).get_vocab()
                        for p in (m.tokenizer_path or m.path, m.reference_path))
    differ = sorted(t for t in student.keys() | teacher.keys() if student.get(t) != teacher.get(t))
    if differ:
        t = differ[0]
        raise ConfigError(f"model.reference_path={m.reference_path}: the teacher's tokenizer differs from the "
                          f"student's in {len(differ)} tokens (e.g. {t!r}: {teacher.get(t)} vs {student.get(t)}); "
                          "on-policy distillation scores the student's token ids with the teacher. Fix: a "
                          "teacher with the student's tokenizer (the same model family)")
    k = cfg.algorithm.distill.topk
    if cfg.algorithm.distill.loss == "gkd" and k > len(teacher):
        raise ConfigError(f"algorithm.distill.topk={k} but the teacher's vocabulary has {len(teacher)} tokens. "
                          f"Fix: algorithm.distill.topk={min(32, len(teacher))}")


def check_sync_bucket(cfg: RunConfig) -> None:
    """A rollout.sync_bucket_mb the user set holds the largest tensor of model.path, at the dtype the
    workers train in (from the placement, not the driver's devices). Left at its default, a larger tensor
    (Llama-3-8B's 1 GB embedding) travels alone in its own bucket (weight_sync.plan_buckets): set, the
    size is a memory bound the user asked for, which the run must not quietly exceed."""
    from rlhf_system.distributed.weight_sync import check_bucket_size

    if "sync_bucket_mb" not in cfg.rollout.model_fields_set:
        return
    check_bucket_size(cfg.model.path, cfg.rollout.sync_bucket_bytes, DTYPES[cfg.train_dtype()].itemsize)
