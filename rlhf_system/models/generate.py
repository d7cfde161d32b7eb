"""Sampling completions from a saved model, with vLLM or with Hugging Face `generate`.

This is the plain, in-process path (CLI `rlhf sample`, evaluation, tests). The Ray-hosted rollout
engines of PPO wrap the same vLLM `LLM` with weight sync on top (workers/rollout.py).

On CPU vLLM needs float32, eager mode and a KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE). There the
engine runs in this process (vLLM's uniprocess executor, no engine-core process): its default spawns two
more processes that import vLLM and torch again, about 15 s of a 2-core machine's start. Set
VLLM_ENABLE_V1_MULTIPROCESSING=1 to keep them; a script that does needs an `if __name__ == "__main__":`
guard.
"""

from __future__ import annotations

import os


def chat_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Prompt token ids: strings become one user turn; message lists are used as they are."""
    ids = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def make_vllm(model_path: str, max_model_len: int = 1024, seed: int = 0, kv_cache_gib: int = 1, **kwargs):
    import torch

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    on_gpu = torch.cuda.is_available()
    from vllm import LLM

    # The inline engine's settings are read while the engine is built, and restored after it: a test
    # process (or a driver that starts Ray next) must not hand them to engines it launches later.
    keys = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
            "OMP_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        if not on_gpu and os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "0":
            from rlhf_system.distributed.threads import bind_engine, node_cores

            bind_engine(",".join(str(c) for c in node_cores()), inline=True)
        return LLM(model=model_path, dtype="auto" if on_gpu else "float32", enforce_eager=not on_gpu,
                   max_model_len=max_model_len, seed=seed, **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shutdown_vllm(llm, timeout: float = 30.0) -> None:
    """Stop the engine's processes now, with a deadline, rather than at interpreter exit (where
    vLLM's atexit hooks log into closed streams)."""
    llm.llm_engine.engine_core.shutdown(timeout=timeout)


def vllm_generate(llm, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                  n: int = 1, seed: int | None = None) -> list[list[list[int]]]:
    """Completion token ids per prompt: out[i][j] is sample j of prompt i."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def hf_generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                temperature: float = 0.0) -> list[list[int]]:
    """Completion token ids (eos included, padding removed), one sample per prompt."""
    import torch

    from rlhf_system.data.collate import pad_to

    ids = pad_to(prompt_ids, tokenizer.pad_token_id, side="left").to(model.device)
    attn = pad_to([[1] * len(p) for p in prompt_ids], 0, side="left").to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0, temperature=temperature or None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    completions = []
    for row in out[:, ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        completions.append([t for t in row if t != tokenizer.pad_token_id])
    return completions


def sample(model_path: str, prompts: list, max_new_tokens: int = 32, backend: str = "vllm",
           temperature: float = 0.0) -> list[str]:
    """Decoded completions (special tokens stripped), one per prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = chat_prompts(tok, prompts)
    if backend == "vllm":
        llm = make_vllm(model_path)
        try:
            outs = [o[0] for o in vllm_generate(llm, prompt_ids, max_new_tokens, temperature)]
        finally:
            shutdown_vllm(llm)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        outs = hf_generate(model, tok, prompt_ids, max_new_tokens, temperature)
    return [tok.decode(o, skip_special_tokens=True) for o in outs]
