"""The training steps of `rlhf check-model` (model_check/report.py): one SFT, RM and GRPO step of a user's model
through the trainers' own functions (data/tokenize, data/collate, algorithms/, workers/sequences), without
Ray or DeepSpeed, so that what is particular to a family (its template and masks, its forward with
packed rows, its classifier head, its sampled log-probs) is tried in seconds.

Each step is a normalised gradient step (length 1e-3 of the weights' norm: no optimiser state, the same
size for a tiny and a 70B model), and passes when its objective moves the right way on the batch it
was taken on: SFT loss down, RM loss down, the GRPO surrogate's advantage-weighted log-prob up.
"""

from __future__ import annotations

import torch


def _step(model, loss: torch.Tensor, size: float = 1e-3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    loss.backward()
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        gnorm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
        wnorm = torch.sqrt(sum((p.float() ** 2).sum() for p in params))
        if not torch.isfinite(gnorm) or gnorm == 0:
            raise RuntimeError(f"the gradient is {'zero' if gnorm == 0 else 'not finite'}")
        scale = size * wnorm / gnorm
        for p in params:
            if p.grad is not None:
                p.add_(-(scale * p.grad.float()).to(p.dtype))
                p.grad = None


def sft_step(model, tok, conversations: list[list[dict]]) -> tuple[bool, str, dict]:
    from rlhf_system.algorithms.losses import sft_loss
    from rlhf_system.data.collate import collate_sft
    from rlhf_system.data.tokenize import encode_with_mask

    samples = [dict(zip(("input_ids", "loss_mask"), encode_with_mask(tok, c, "chat", 0, f"conversation {i}")))
               for i, c in enumerate(conversations)]
    batch = {k: v.to(model.device) for k, v in collate_sft(samples, tok.pad_token_id).items()}

    def loss() -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return sft_loss(logits, batch["input_ids"], batch["loss_mask"])[0]

    before = loss()
    _step(model, before)
    with torch.no_grad():
        after = loss()
    ok = bool(torch.isfinite(after) and after < before)
    return ok, f"assistant-only loss {before.item():.4f} -> {after.item():.4f} after one step", \
        {"loss": [before.item(), after.item()]}


def rm_step(path: str, tok, chosen: list[dict], rejected: list[dict], dtype, device) -> tuple[bool, str, dict]:
    """The reward model a user would train from this checkpoint: its classifier twin with a fresh head."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_system.algorithms.losses import pairwise_rm_loss
    from rlhf_system.data.collate import pad_to
    from rlhf_system.data.tokenize import render_conversation

    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype).to(device)
    rm.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token of each row
    seqs = [tok(render_conversation(tok, m, "chat"), add_special_tokens=False)["input_ids"] for m in (chosen, rejected)]
    ids, attn = pad_to(seqs, tok.pad_token_id).to(device), pad_to([[1] * len(s) for s in seqs], 0).to(device)

    def loss() -> torch.Tensor:
        r = rm(input_ids=ids, attention_mask=attn).logits[:, 0]
        return pairwise_rm_loss(r[:1], r[1:])[0]

    name = type(rm).__name__
    before = loss()
    _step(rm, before)
    with torch.no_grad():
        after = loss()
    return bool(torch.isfinite(after) and after < before), \
        f"{name}: pair loss {before.item():.4f} -> {after.item():.4f} after one step", {"loss": [before.item(), after.item()]}


def grpo_step(model, tok, llm, prompt: list[dict], tol: float, n: int = 4) -> tuple[bool, str, dict]:
    """Sample n answers with the engine, score them (longer is better: any signal will do), and take the
    GRPO step on the engine's tokens. Checks on the way: the trainer's log-probs of the engine's samples
    equal the engine's (what importance sampling needs), and the padding-free layout equals the padded one."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rlhf_system.algorithms.advantages import compute_advantages
    from rlhf_system.algorithms.losses import policy_loss_ppo
    from rlhf_system.data.experience import Experience
    from rlhf_system.data.tokenize import render_prompt
    from rlhf_system.workers.sequences import policy_forward

    p = tok(render_prompt(tok, prompt, "chat"), add_special_tokens=False)["input_ids"]
    out = llm.generate([TokensPrompt(prompt_token_ids=p)],
                       SamplingParams(n=n, temperature=1.0, max_tokens=12, logprobs=0, seed=0), use_tqdm=False)[0]
    responses = [list(c.token_ids) for c in out.outputs]
    rollout = [[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in out.outputs]
    exp = Experience.from_rollout([p] * n, responses, tok.pad_token_id, rollout)
    mask = exp.response_mask.float().to(model.device)
    with torch.no_grad():
        padded, _ = policy_forward(model, exp)
        flat, _ = policy_forward(model, exp, flat=True)
    mismatch = ((padded - exp.rollout_logprobs.to(padded.device)).abs() * mask).max().item()
    layouts = ((padded - flat).abs() * mask).max().item()
    scores = torch.tensor([float(len(r)) for r in responses])
    if scores.std() == 0:
        scores = torch.arange(n, dtype=torch.float32)  # all the same length: rank them instead
    adv, _ = compute_advantages("grpo", scores=scores, mask=mask.cpu(), group_size=n)
    adv = adv.to(model.device)
    lp, _ = policy_forward(model, exp)
    loss, _ = policy_loss_ppo(lp, padded.detach(), adv, mask)
    objective = lambda x: (adv * x * mask).sum().item()
    before = objective(padded)
    _step(model, loss)
    with torch.no_grad():
        after = objective(policy_forward(model, exp)[0])
    ok = mismatch <= tol and layouts <= tol and after > before
    return ok, (f"trainer vs engine log-probs {mismatch:.1e}, padded vs padding-free {layouts:.1e} (tolerance "
                f"{tol:g}); advantage-weighted log-prob {before:.4f} -> {after:.4f}"), \
        {"mismatch": mismatch, "layouts": layouts, "objective": [before, after]}
