"""Per-token log-probabilities, entropies and masked reductions, in pure torch.

What this is: the small tensor functions every trainer shares to turn a causal LM's logits into
per-token quantities, and the masked sum/mean used to reduce them.

What this is not: it runs no model, knows no tokenizer, and has no distributed code. Reductions
across ranks or gradient-accumulation steps are the caller's job (see `losses.sft_loss_sum`).

Shapes: B batch, T sequence positions, V vocabulary. Log-probabilities come back in float32 (or
float64 for float64 logits) whatever the logits' dtype: bf16 has 8 bits of mantissa, so a bf16
log-softmax over a 100k+ vocabulary loses the small differences (policy vs. old policy vs.
reference) that ratios and KL terms are made of.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_CHUNK = 1024


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32; float32/float64 are returned as they are (no copy)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_position(
    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    chunk_size: int,
) -> torch.Tensor:
    """Apply `fn(z (n, V), labels (n,) | None) -> (n,)` over (B, T, V) logits, chunk by chunk.

    Why chunks: an upcast log-softmax of the whole (B, T, V) tensor is B*T*V*4 bytes (e.g. 8 x
    4096 x 152k = 20 GB). Walking one batch row and `chunk_size` positions at a time bounds the
    transient to chunk_size*V floats. Rows are not flattened to (B*T, V): callers pass
    `logits[:, :-1]`, which is not viewable as (B*T, V), so `reshape` would copy all of it.
    Under autograd, the float32 copies of bf16 chunks are still kept for the backward pass; the
    saving is then in the forward transient only (float32 logits are never copied).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T = logits.shape[:2]
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    if B == 0 or T == 0:
        return logits.new_zeros((B, T), dtype=out_dtype)
    rows = []
    for b in range(B):
        parts = []
        for t0 in range(0, T, chunk_size):
            z = _upcast(logits[b, t0:t0 + chunk_size])
            if temperature != 1.0:
                z = z / temperature
            parts.append(fn(z, None if labels is None else labels[b, t0:t0 + chunk_size]))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def _label_logprob(z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    # log p(y) = z_y - logsumexp(z): never materialises the (n, V) log-softmax.
    return z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _entropy(z: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
    # H = -sum p log p = logsumexp(z) - sum p z.
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, *, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """log p(labels[b, t] | logits[b, t]) for every position: (B, T, V), (B, T) -> (B, T) float32.

    It does NOT shift. For a causal LM, logits at position t predict token t+1, so callers pass
    `logits[:, :-1]` with `labels = input_ids[:, 1:]` (or use `shifted_logprobs`). Labels must be
    valid ids in [0, V) everywhere, padding included (use the pad id, not -100), and padded
    positions are then dropped with a mask.

    `temperature` divides the logits first, so that log-probs match those of a sampler run at that
    temperature (PPO ratios against vLLM rollouts need the same distribution that sampled them).
    bf16/fp16 logits are upcast to float32 chunk by chunk (see module docstring for why).
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} minus V")
    return _per_position(_label_logprob, logits, labels, temperature, chunk_size)


def shifted_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0, *, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Next-token log-probs of a sequence: logits (B, T, V), input_ids (B, T) -> (B, T-1).

    Entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]). Token 0 gets no log-prob (nothing
    predicts it) and the logits at the last position are unused. A (B, T) token mask aligns with
    the result as `mask[:, 1:]`.
    """
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature, chunk_size=chunk_size)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, *, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Entropy of the softmax at each position: (B, T, V) -> (B, T), float32, in nats.

    Logits must be finite: a -inf logit gives 0 * -inf = NaN in the sum p*z.
    """
    return _per_position(_entropy, logits, None, temperature, chunk_size)


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.shape != x.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of x {tuple(x.shape)}")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is 1: x and mask of the same shape (e.g. (B, T)); dim=None sums all.

    Positions where mask is 0 are selected away with `torch.where`, not multiplied by 0, so inf or
    NaN there (e.g. log-probs of padding) cannot leak into the result or its gradient. The mask is
    read as boolean: it is a 0/1 selection, not a weighting.
    """
    _check_mask(x, mask)
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1; 0 (not NaN) where the mask is all zero.

    Shapes as `masked_sum`. An all-zero mask is a normal event, not an error: a micro-batch whose
    responses were all truncated away, or a rank that got only prompt tokens. 0/0 = NaN there would
    reach the optimiser through the gradient all-reduce and poison every rank's weights; returning
    0 (with zero gradient) makes that micro-batch contribute nothing instead. The count is clamped
    to at least 1, which changes nothing when some position is kept (counts are integers).
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)
