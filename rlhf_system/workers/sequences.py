"""The forwards that score (prompt, response) sequences on a rank: response log-probs of a policy,
per-token values of a critic. Used by the PPO role workers (actor.py, reference.py, critic.py).

Micro-batches are cut from rows sorted by length (`length_order`), so each carries little padding.
"""

from __future__ import annotations

import torch

from rlhf_system.algorithms.logprobs import entropy_from_logits, token_logprobs
from rlhf_system.data.experience import Experience


def _at_response(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) -> (B, T, ...): the positions that predict each response token."""
    idx = index.to(x.device)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def policy_forward(engine, batch: Experience, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) of the response tokens under `engine`'s model at `temperature` (the sampling
    temperature, so they are comparable with vLLM's), and optionally the per-token entropy.

    Only the suffix of positions that predict some response token is projected to the vocabulary
    (`logits_to_keep`, the model's own forward, so logit soft-capping or scaling still apply): the
    prompt positions before the shortest prompt never get (B, L, V) logits."""
    device = engine.device
    L = batch.sequences.shape[1]
    keep = L - max(0, int(batch.prompt_lens.min()) - 1)
    logits = engine(input_ids=batch.sequences.to(device), attention_mask=batch.attention_mask.to(device),
                    use_cache=False, logits_to_keep=keep).logits
    logits = _at_response(logits, batch.gather_index - (L - keep))
    lp = token_logprobs(logits, batch.response_ids.to(device), temperature)
    ent = entropy_from_logits(logits, temperature) if with_entropy else None
    return lp, ent


def value_forward(engine, batch: Experience) -> torch.Tensor:
    """Per-token values (B, T) from a sequence-classification model's score head applied at every
    position (the critic): V(s_t) for the state before each response token."""
    device = engine.device
    out = engine(input_ids=batch.sequences.to(device), attention_mask=batch.attention_mask.to(device),
                 output_hidden_states=True, use_cache=False)
    module = engine.module
    head = getattr(module, "score", None)
    if head is None:
        head = module.get_submodule("base_model.model.score")  # peft-wrapped classifier
    hidden = _at_response(out.hidden_states[-1], batch.gather_index)
    return head(hidden).squeeze(-1).float()


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def batched(fn, exp: Experience, micro: int) -> torch.Tensor:
    """Run `fn(batch) -> (b, t)` over micro-batches of `exp`; returns (B, T) in row order, 0 past each
    response. Rows are grouped by length first, so each micro-batch carries little padding."""
    out = torch.zeros(len(exp), exp.T)
    order = length_order(exp)
    for sl in micro_slices(len(exp), micro):
        rows = order[sl]
        vals = fn(exp.select(rows)).float().cpu()
        out[rows, :vals.shape[1]] = vals
    return out * exp.response_mask


def length_order(exp: Experience) -> torch.Tensor:
    """Row indices sorted by sequence length (stable): neighbours pad to similar lengths."""
    return torch.argsort(exp.prompt_lens + exp.response_lens, stable=True)
