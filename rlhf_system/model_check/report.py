"""`rlhf check-model PATH`: what will and will not work with a user's model, before a long run.

    report = check_model("/models/Qwen2.5-7B-Instruct")   # {"model", "ok", "checks": [{name, ok, detail}]}

Each check runs the code the trainers run, on a probe conversation:
- load       the config, the architecture, the parameter count (transformers' from_pretrained);
- template   the chat template renders a system + user prompt with the generation prompt, and an
             assistant turn ends with the tokenizer's eos token (where generation stops);
- masks      the assistant-only loss mask (data/tokenize.encode_with_mask) of a two-turn conversation
             trains exactly the assistant turns: every assistant content, no user content;
- reasoning  (advice) a two-turn conversation whose first answer has a <think> block still masks (a
             template that drops earlier reasoning, as Qwen3's does, is not prefix-stable);
- tools      (advice) the template renders tool results (data/tokenize.check_tool_template: rollout.env=tools);
- lora       the default peft.lora.target_modules exist in the model, and peft wraps them;
- vllm       vLLM loads the model (on CPU: vLLM's CPU build, float32) and scores the probe;
- parity     vLLM's log-probs of the probe equal transformers' (1e-4 in float32);
- sync       weights changed on the trainer side and loaded into the running engine through the weight
             sync's own reload (distributed/vllm_ext.reload_in_place) give vLLM log-probs equal to
             transformers' on the changed weights, and differ before the load (the negative control);
- export     the changed model saves (safetensors) and loads back in transformers with equal logits.

Advice checks never fail the run; the others make `ok` false and the command exit 1.
"""

from __future__ import annotations

import time
import traceback

PROBE = [{"role": "system", "content": "You are a careful assistant."},
         {"role": "user", "content": "What is 12 + 30?"},
         {"role": "assistant", "content": "12 + 30 = 42."},
         {"role": "user", "content": "And 7 times 6?"},
         {"role": "assistant", "content": "7 x 6 = 42 as well."}]
THINK = "<think>\nadd the tens, then the units\n</think>\n\n"
ADVICE = ("reasoning", "tools")  # checks that report, never fail


class _Report:
    def __init__(self, path: str):
        self.doc = {"model": path, "ok": True, "checks": []}

    def add(self, name: str, ok: bool, detail: str, **extra) -> None:
        self.doc["checks"].append({"name": name, "ok": ok, "detail": detail, **extra})
        if not ok and name not in ADVICE:
            self.doc["ok"] = False

    def run(self, name: str, fn):
        """fn() -> (ok, detail, extra) or raises; a raise is a failed check whose detail is the error's line."""
        t = time.perf_counter()
        try:
            ok, detail, *extra = fn()
        except Exception as e:
            line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            ok, detail, extra = False, f"{type(e).__name__}: {line}", []
            if not line:
                detail += " " + traceback.format_exc(limit=2).splitlines()[-1]
        self.add(name, ok, detail, seconds=round(time.perf_counter() - t, 2), **(extra[0] if extra else {}))
        return ok


def _trained_text(tok, messages: list[dict]) -> str:
    from rlhf_system.data.tokenize import encode_with_mask

    ids, mask = encode_with_mask(tok, messages, "chat", 0, "the probe conversation")
    return tok.decode([i for i, m in zip(ids, mask) if m])


def _masks(tok, messages: list[dict]) -> tuple[bool, str]:
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    others = [m["content"] for m in messages if m["role"] != "assistant"]
    trained = _trained_text(tok, messages)
    missing = [a for a in answers if a not in trained]
    leaked = [o for o in others if o in trained]
    ok = not missing and not leaked
    return ok, (f"trains {len(answers)} assistant turns: {trained!r}" if ok else
                f"mask wrong: missing {missing}, trained non-assistant text {leaked} (trained: {trained!r})")


def _template(tok) -> tuple[bool, str]:
    from rlhf_system.data.tokenize import render_conversation, render_prompt

    if not getattr(tok, "chat_template", None):
        return False, "the tokenizer has no chat_template: use data.template=plain, or a tokenizer with one"
    prompt = render_prompt(tok, PROBE[:2], "chat")
    whole = render_conversation(tok, PROBE[:3], "chat").rstrip()
    eos = tok.eos_token
    if not whole.endswith(eos):
        return False, (f"an assistant turn ends with {whole[-20:]!r}, not the eos token {eos!r}: generation would "
                       "not stop at the end of a turn. Fix: set the tokenizer's eos_token to the end-of-turn token")
    return True, f"prompt ends {prompt[-30:]!r}; an answer ends with eos {eos!r}"


def _lora(model) -> tuple[bool, str, dict]:
    from peft import LoraConfig, get_peft_model

    from rlhf_system.config import LoraConfig as Defaults
    from rlhf_system.models.load import linear_names

    targets = Defaults().target_modules  # what a run with peft.lora.enabled=true would wrap
    linear = [n for n in linear_names(model) if n != "lm_head"]  # adapters go on the blocks, not the head
    found = [t for t in targets if t in linear]
    suggest = [n for n in linear if n.endswith("proj")] or linear
    if not found:
        return False, f"none of the default targets {targets} is a linear layer here; its linears: " \
                      f"{linear}. Fix: peft.lora.target_modules={suggest}", {"linear": linear}
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=suggest))
    n = sum(p.numel() for name, p in wrapped.named_parameters() if "lora_" in name)
    wrapped.unload()
    model.requires_grad_(True)  # peft froze the base weights; the training checks need them back
    missing = [t for t in targets if t not in linear]
    note = f"; the defaults miss {missing}: peft.lora.target_modules={suggest}" if missing else ""
    return True, f"targets {suggest}: {n} adapter parameters at r=4{note}", {"linear": linear}


def _hf_logprobs(model, ids: list[int]) -> list[float]:
    import torch

    from rlhf_system.algorithms.logprobs import shifted_logprobs

    x = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        return shifted_logprobs(model(x).logits, x)[0].tolist()


def _vllm_logprobs(llm, ids: list[int]) -> list[float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], ids[1:])]


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def _train_step(model, seed: int = 0) -> list[tuple[str, object]]:
    """Move every parameter by 5% of its spread, as a large update would, and return what the weight sync
    sends for it, bucket by bucket (distributed/weight_sync: checkpoint names, tied weights once, LoRA
    merged, fused experts split), as the engine's worker unflattens it."""
    import torch

    from rlhf_system.distributed.weight_sync import iter_buckets, plan_buckets, sources, unflatten

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype)
            p.add_(0.05 * (p.float().std().nan_to_num(0.02).item() + 1e-3) * noise)
    plan = plan_buckets([s.meta for s in sources(model)], 64 * 2**20)
    return [pair for bucket, buf in zip(plan, iter_buckets(model, plan, zero_stage=0, is_sender=True))
            for pair in unflatten(buf, bucket)]


def check_model(path: str, vllm: bool = True, tol: float | None = None, rm: bool = True) -> dict:
    """The report (module docstring). `vllm` False skips the engine checks (a machine without vLLM); `rm`
    False skips the RM step, which loads a second copy of the weights as a classifier (a large model's
    memory twice, for a few seconds)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf_system.data.tokenize import check_tool_template
    from rlhf_system.model_check.steps import rm_step, sft_step

    rep = _Report(path)
    on_gpu = torch.cuda.is_available()
    tol = tol if tol is not None else (1e-4 if not on_gpu else 2e-2)  # bf16 on a GPU: kernels differ more
    state: dict = {}

    def load():
        cfg = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if on_gpu else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        state.update(tok=tok, model=model.to("cuda") if on_gpu else model)
        n = sum(p.numel() for p in model.parameters())
        return True, f"{cfg.architectures[0] if cfg.architectures else type(model).__name__} " \
                     f"({cfg.model_type}), {n / 1e6:.2f}M parameters, {dtype}", {"model_type": cfg.model_type}

    if not rep.run("load", load):
        return rep.doc
    tok, model = state["tok"], state["model"]
    rep.run("template", lambda: _template(tok))
    rep.run("masks", lambda: _masks(tok, PROBE))
    thinking = [dict(m) for m in PROBE]
    thinking[2]["content"] = THINK + thinking[2]["content"]
    rep.run("reasoning", lambda: _masks(tok, thinking))

    def tools():
        check_tool_template(tok, "chat", path)
        return True, "renders tool-role messages (rollout.env=tools works)"

    rep.run("tools", tools)
    rep.run("lora", lambda: _lora(model))
    if vllm:
        _engine_checks(rep, path, tok, model, tol)
    chosen = PROBE[:3]
    rejected = [*PROBE[:2], {"role": "assistant", "content": "12 + 30 = 24."}]
    rep.run("sft", lambda: sft_step(model, tok, [PROBE, chosen]))
    if rm:
        rep.run("rm", lambda: rm_step(path, tok, chosen, rejected, model.dtype, model.device))
    return rep.doc


def _engine_checks(rep: _Report, path: str, tok, model, tol: float) -> None:
    """vLLM: load, parity with transformers, a GRPO step on its samples, the weight sync, the export."""
    from transformers import AutoModelForCausalLM

    from rlhf_system.data.tokenize import render_conversation
    from rlhf_system.model_check.steps import grpo_step

    ids = tok(render_conversation(tok, PROBE, "chat"), add_special_tokens=False)["input_ids"]
    hf = _hf_logprobs(model, ids)

    def engine():
        from rlhf_system.models.generate import make_vllm

        state["llm"] = make_vllm(path, max_model_len=max(256, len(ids) + 8), gpu_memory_utilization=0.3)
        return True, f"vLLM loaded {path}"

    state: dict = {}
    if not rep.run("vllm", engine):
        return
    llm = state["llm"]
    try:
        def parity():
            g = _gap(_vllm_logprobs(llm, ids), hf)
            return g <= tol, f"max |vLLM - transformers| log-prob {g:.2e} over {len(hf)} tokens (tolerance {tol:g})", \
                {"gap": g}

        rep.run("parity", parity)
        rep.run("grpo", lambda: grpo_step(model, tok, llm, PROBE[:2], tol))

        def sync():
            from rlhf_system.distributed.vllm_ext import reload_in_place

            sent = _train_step(model)
            before = _gap(_vllm_logprobs(llm, ids), _hf_logprobs(model, ids))
            llm.collective_rpc(reload_in_place, args=(sent,))
            after = _gap(_vllm_logprobs(llm, ids), _hf_logprobs(model, ids))
            ok = after <= tol < before
            return ok, (f"after loading changed weights: gap {after:.2e} (before the load: {before:.2e}, must "
                        f"exceed {tol:g})"), {"gap": after, "gap_before": before}

        rep.run("sync", sync)
    finally:
        from rlhf_system.models.generate import shutdown_vllm

        shutdown_vllm(llm)

    def export():
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d, safe_serialization=True)
            back = AutoModelForCausalLM.from_pretrained(d, dtype=model.dtype).to(model.device).eval()
            g = _gap(_hf_logprobs(back, ids), _hf_logprobs(model, ids))
        return g == 0.0, f"saved and reloaded: log-prob gap {g:.1e}"

    rep.run("export", export)
