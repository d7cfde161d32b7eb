"""The forwards that score (prompt, response) sequences on a rank: response log-probs of a policy,
per-token values of a critic. Used by the PPO role workers (actor.py, reference.py, critic.py).

Two layouts, the same numbers (tests/unit/test_rl_forward_layouts.py, 1e-5 in fp32):
- padded: the Experience's (B, L) rows with an attention mask. Micro-batches are cut from rows sorted
  by length (`micro_batches`), so each carries little padding.
- flat (`train.padding_free`): each row's real tokens concatenated into one (1, N) row, position ids
  restarting per row and no mask, the layout transformers reads as packed sequences (FA2's varlen
  kernel on GPU; a block-diagonal mask elsewhere). No FLOP goes to padding, and only the positions
  that predict a response token are projected to the vocabulary.
"""

from __future__ import annotations

import torch

from rlhf_system.algorithms.gkd import logprobs_at, topk_logprobs
from rlhf_system.algorithms.logprobs import entropy_from_logits, token_logprobs
from rlhf_system.data.experience import Experience


def _at_response(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) -> (B, T, ...): the positions that predict each response token."""
    idx = index.to(x.device)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


class Flat:
    """The flat layout of a batch: (1, N) input ids and position ids, and `at` (K,), the flat positions
    that predict the response tokens, row by row (the order of `batch.response_mask`'s ones)."""

    def __init__(self, batch: Experience):
        lens = (batch.prompt_lens + batch.response_lens).tolist()
        starts = [0]
        for n in lens[:-1]:
            starts.append(starts[-1] + n)
        self.input_ids = torch.cat([batch.sequences[b, :n] for b, n in enumerate(lens)])[None]
        self.position_ids = torch.cat([torch.arange(n) for n in lens])[None]
        self.at = torch.cat([torch.arange(int(r)) + s + int(p) - 1 for s, p, r in zip(
            starts, batch.prompt_lens.tolist(), batch.response_lens.tolist())]).long()
        self.mask = batch.response_mask.bool()

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(K, ...) per predicted token -> (B, T, ...), 0 past each response."""
        out = values.new_zeros(*self.mask.shape, *values.shape[1:])
        out[self.mask.to(values.device)] = values
        return out


def _flat_forward(engine, flat: Flat, **kwargs):
    device = engine.device
    # use_cache=False: transformers finds the packed rows' boundaries from restarting position ids only
    # without a cache (as for the SFT flat layout, data/collate.py)
    out = engine(input_ids=flat.input_ids.to(device), position_ids=flat.position_ids.to(device), use_cache=False,
                 **kwargs)
    return out


def _response_logits(engine, batch: Experience, flat: bool):
    """The logits that predict the response tokens, the tokens, and two maps: per-token results of the
    layout back to (B, T, ...), and (B, T, ...) inputs into the layout. Padded: (B, T, V) logits and
    identities; flat: (1, K, V) logits, `Flat.scatter` and its inverse.

    Only the suffix of positions that predict some response token is projected to the vocabulary
    (`logits_to_keep`, the model's own forward, so logit soft-capping or scaling still apply): the
    prompt positions before the shortest prompt never get (B, L, V) logits. flat: the padding-free
    layout (`Flat`), where exactly the predicting positions are projected."""
    if flat:
        layout = Flat(batch)
        logits = _flat_forward(engine, layout, logits_to_keep=layout.at.to(engine.device)).logits  # (1, K, V)
        return (logits, batch.response_ids[layout.mask][None].to(logits.device), lambda x: layout.scatter(x[0]),
                lambda x: x[layout.mask][None])
    device = engine.device
    L = batch.sequences.shape[1]
    keep = L - max(0, int(batch.prompt_lens.min()) - 1)
    logits = engine(input_ids=batch.sequences.to(device), attention_mask=batch.attention_mask.to(device),
                    use_cache=False, logits_to_keep=keep).logits
    logits = _at_response(logits, batch.gather_index - (L - keep))
    return logits, batch.response_ids.to(device), lambda x: x, lambda x: x


def policy_forward(engine, batch: Experience, temperature: float = 1.0, with_entropy: bool = False,
                   flat: bool = False, at_ids: torch.Tensor | None = None):
    """Log-probs (B, T) of the response tokens under `engine`'s model at `temperature` (the sampling
    temperature, so they are comparable with vLLM's), and the per-token entropy (None unless
    with_entropy). With `at_ids` (B, T, k), a third result: the log-probs (B, T, k) of those tokens at
    each response position (GKD's student side, algorithms/gkd.py), from the same forward."""
    logits, ids, back, to_layout = _response_logits(engine, batch, flat)
    lp = back(token_logprobs(logits, ids, temperature))
    ent = back(entropy_from_logits(logits, temperature)) if with_entropy else None
    if at_ids is None:
        return lp, ent
    return lp, ent, back(logprobs_at(logits, to_layout(at_ids).to(logits.device), temperature))


def policy_topk(engine, batch: Experience, k: int, temperature: float = 1.0,
                flat: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From one forward: the log-probs (B, T) of the response tokens, as `policy_forward`, and the k most
    likely tokens (B, T, k) at each response position with their log-probs (B, T, k), at `temperature`
    (GKD's teacher side, algorithms/gkd.py)."""
    logits, ids, back, _ = _response_logits(engine, batch, flat)
    top_ids, top_lps = topk_logprobs(logits, k, temperature)
    return back(token_logprobs(logits, ids, temperature)), back(top_ids), back(top_lps)


def value_forward(engine, batch: Experience, flat: bool = False) -> torch.Tensor:
    """Per-token values (B, T) from a sequence-classification model's score head applied at every
    position (the critic): V(s_t) for the state before each response token."""
    module = engine.module
    head = getattr(module, "score", None)
    if head is None:
        head = module.get_submodule("base_model.model.score")  # peft-wrapped classifier
    if flat:
        layout = Flat(batch)
        last = _flat_forward(engine, layout, output_hidden_states=True).hidden_states[-1]
        hidden = last[0, layout.at.to(last.device)]
        return layout.scatter(head(hidden).squeeze(-1).float())
    device = engine.device
    out = engine(input_ids=batch.sequences.to(device), attention_mask=batch.attention_mask.to(device),
                 output_hidden_states=True, use_cache=False)
    hidden = _at_response(out.hidden_states[-1], batch.gather_index)
    return head(hidden).squeeze(-1).float()


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def micro_batches(train, lengths: torch.Tensor, device, world: int) -> list[torch.Tensor]:
    """Positions into `lengths` (each row's tokens) cut into micro-batches, as `train` (TrainConfig) says:
    - micro_batch_size rows, from rows sorted by length (each micro-batch carries little padding);
    - max_tokens_per_micro_batch: as few micro-batches as fit the budget, balanced by tokens
      (algorithms/balance.py), the count agreed by all ranks (every rank runs as many forwards).
    Every row is in exactly one micro-batch."""
    if not train.max_tokens_per_micro_batch:
        order = torch.argsort(lengths, stable=True)
        return [order[sl] for sl in micro_slices(len(order), train.micro_batch_size)]
    import torch.distributed as dist

    from rlhf_system.algorithms.balance import token_micro_batches
    from rlhf_system.distributed.devices import all_reduce_max

    def agree(k: int) -> int:
        if not (dist.is_initialized() and world > 1):
            return k
        return int(all_reduce_max(torch.tensor([k]), device)[0])

    parts = token_micro_batches(lengths.tolist(), train.max_tokens_per_micro_batch, agree)
    return [torch.tensor(p, dtype=torch.long) for p in parts]


@torch.no_grad()
def batched(fn, exp: Experience, parts: list[torch.Tensor]):
    """Run `fn(batch)` over the micro-batches `parts` (row indices of `exp`, `micro_batches`); fn gives a
    (b, t, ...) tensor or a tuple of them, and the result is (B, T, ...) each, in row order, on the CPU,
    0 past each response (floats as float32, ids as they are)."""
    outs = None
    for rows in parts:
        got = fn(exp.select(rows))
        got = got if isinstance(got, tuple) else (got,)
        if outs is None:
            outs = [torch.zeros(len(exp), exp.T, *g.shape[2:], dtype=g.dtype if not g.is_floating_point()
                                else torch.float32) for g in got]
        for out, g in zip(outs, got):
            out[rows, :g.shape[1]] = g.to("cpu", out.dtype)
    if outs is None:  # no rows
        outs = [torch.zeros(len(exp), exp.T)]
    keep = exp.response_mask
    outs = [o * keep.view(*keep.shape, *[1] * (o.dim() - 2)).to(o.dtype) for o in outs]
    return outs[0] if len(outs) == 1 else tuple(outs)


def lengths(exp: Experience) -> torch.Tensor:
    """Tokens per row (prompt + response)."""
    return exp.prompt_lens + exp.response_lens
