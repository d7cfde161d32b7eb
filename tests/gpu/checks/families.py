"""Check `families`: `rlhf check-model` (model_check/report.py) on the eight tiny family models, on the GPU in
bf16: load, template, masks, LoRA targets, one SFT and one RM step; with vLLM installed also its load,
log-prob parity (2e-2 in bf16), a GRPO step on its samples and the weight sync's reload. On CPU all of
them pass (tests/integration/test_families.py); here it is the families' bf16 kernels (Gemma's
soft-capping, the MoE's fused experts, Phi-3's fused projections) that have never run."""

from tests.gpu.checks.common import main, missing, need


def check(work):
    need("transformers", "peft")
    from rlhf_system.model_check.report import check_model
    from rlhf_system.models.families import FAMILIES
    from rlhf_system.models.tiny import TinySpec, make_tiny_model

    spec = TinySpec(vocab_size=768, hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2, intermediate_size=256)
    corpus = ["What is 12 + 30? The answer is 42. And 7 times 6? 42 as well. You are a careful assistant."] * 50
    engine = not missing("vllm")
    failed, gaps = {}, {}
    for name in FAMILIES:
        path = make_tiny_model(work / "families" / name, spec, corpus=corpus, family=name)["policy"]
        report = check_model(str(path), vllm=engine)
        failed[name] = [c["name"] + ": " + c["detail"][:160] for c in report["checks"]
                        if not c["ok"] and c["name"] not in ("reasoning", "tools")]
        gaps[name] = {c["name"]: c["gap"] for c in report["checks"] if "gap" in c}
    return {"ok": not any(failed.values()), "engine": engine, "failed": failed, "gaps": gaps}


if __name__ == "__main__":
    raise SystemExit(main("families", check))
