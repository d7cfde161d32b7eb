"""Per-rank model work of a PPO step: batches of (prompt, response) sequences and the forwards that
score them. Runs inside the role workers (workers/actor.py, critic.py, reference.py, reward.py).

Layout. A sample is {"prompt_ids": [...], "response_ids": [...]}. `collate_sequences` lays each row
out as prompt + response, right-padded, so positions start at 0 for every row as they do in vLLM (no
left padding, no custom position ids). Per-token quantities of the response come back as (B, T)
tensors, T = the longest response in the batch, response token j of every row in column j:
response token j of row b sits at sequence position P_b + j and is predicted by the logits (and
valued by the hidden state) at position P_b + j - 1, which `gather_index` picks out.
"""

from __future__ import annotations

import torch

from rlhf_system.algorithms.logprobs import entropy_from_logits, token_logprobs
from rlhf_system.data.collate import pad_to


def collate_sequences(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    seqs = [s["prompt_ids"] + s["response_ids"] for s in samples]
    prompt_lens = torch.tensor([len(s["prompt_ids"]) for s in samples])
    resp_lens = torch.tensor([len(s["response_ids"]) for s in samples])
    T = max(1, int(resp_lens.max()))
    return {
        "input_ids": pad_to(seqs, pad_id),
        "attention_mask": pad_to([[1] * len(s) for s in seqs], 0),
        "response_ids": pad_to([s["response_ids"] or [pad_id] for s in samples], pad_id)[:, :T],
        "response_mask": (torch.arange(T)[None, :] < resp_lens[:, None]).float(),
        "gather_index": (prompt_lens[:, None] - 1 + torch.arange(T)[None, :]).clamp(
            max=max(len(s) for s in seqs) - 1),
    }


def _at_response(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) -> (B, T, ...): the positions that predict each response token."""
    idx = index.to(x.device)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def policy_forward(engine, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) of the response tokens under `engine`'s model at `temperature` (the sampling
    temperature, so they are comparable with vLLM's), and optionally the per-token entropy."""
    device = engine.device
    logits = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    use_cache=False).logits
    logits = _at_response(logits, batch["gather_index"])
    lp = token_logprobs(logits, batch["response_ids"].to(device), temperature)
    ent = entropy_from_logits(logits, temperature) if with_entropy else None
    return lp, ent


def value_forward(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token values (B, T) from a sequence-classification model's score head applied at every
    position (the critic): V(s_t) for the state before each response token."""
    device = engine.device
    out = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                 output_hidden_states=True, use_cache=False)
    module = engine.module
    head = getattr(module, "score", None)
    if head is None:
        head = module.get_submodule("base_model.model.score")  # peft-wrapped classifier
    hidden = _at_response(out.hidden_states[-1], batch["gather_index"])
    return head(hidden).squeeze(-1).float()


def pad_floats(rows: list[list[float]]) -> torch.Tensor:
    """Per-sample response-token values -> (B, T) float32, right-padded with 0 (T = longest row, >= 1)."""
    T = max(1, max(len(r) for r in rows))
    return torch.tensor([list(r) + [0.0] * (T - len(r)) for r in rows], dtype=torch.float32)


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def batched(fn, samples: list[dict], pad_id: int, micro: int) -> list[list[float]]:
    """Run `fn(batch) -> (B, T)` over micro-batches; per-sample lists trimmed to response length."""
    out: list[list[float]] = []
    for sl in micro_slices(len(samples), micro):
        part = samples[sl]
        vals = fn(collate_sequences(part, pad_id)).float().cpu()
        out += [vals[i, :len(s["response_ids"])].tolist() for i, s in enumerate(part)]
    return out
