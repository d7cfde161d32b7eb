"""Experience: the one typed batch of a PPO step, the only thing that crosses Ray between the
controller (trainers/ppo.py) and the role workers (workers/actor.py, critic.py, reference.py).

What this is: B (prompt, response) sequences and what each role adds to them, as tensors. What this is
not: it runs no model (workers/sequences.py does) and computes no advantages (algorithms/ does).

Layout. Row b holds prompt b then response b, right-padded with `pad_id`, so positions start at 0 in
every row as in vLLM. Per-token fields of the response are (B, T) with T = the longest response of
the batch: column j is response token j, 0 past the row's end. `select` cuts rows (and trims the
padding they no longer need); slicing (`exp[a:b]`) cuts a data-parallel share and keeps the shapes.

Transport. Pickled (Ray's object store), every tensor travels as a NumPy array, which Ray stores out of
band and hands back without a copy; the receiver wraps it in a tensor again (read-only memory, which
the workers never write to).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch


@dataclass
class Experience:
    sequences: torch.Tensor                      # (B, L) int64: prompt + response ids, right-padded with pad_id
    prompt_lens: torch.Tensor                    # (B,) int64: prompt tokens per row
    response_lens: torch.Tensor                  # (B,) int64: response tokens per row (0 allowed)
    pad_id: int
    rollout_logprobs: torch.Tensor | None = None  # (B, T) f32: the engine's sampling log-probs (after temperature)
    old_logprobs: torch.Tensor | None = None      # (B, T) f32: the actor's, before the update; None: the update
    #                                               takes its own, detached (one optimiser step per rollout)
    ref_logprobs: torch.Tensor | None = None      # (B, T) f32: the frozen reference's
    values: torch.Tensor | None = None            # (B, T) f32: the critic's V(s_t) before the update
    advantages: torch.Tensor | None = None        # (B, T) f32: per-token advantages (algorithms/advantages.py)
    returns: torch.Tensor | None = None           # (B, T) f32: value targets (GAE only)
    index: torch.Tensor | None = None             # (B,) int64: row of the step's batch (for error messages)
    action_mask: torch.Tensor | None = None       # (B, T) f32: 1 on the response tokens the policy is trained on;
    #                                               None: all of them. 0 on environment / tool tokens inside a
    #                                               multi-turn response, and on rows left out of the loss
    #                                               (DAPO's overlong filter)
    teacher_ids: torch.Tensor | None = None       # (B, T, k) int64: the teacher's k most likely tokens at each
    #                                               response position (algorithm.distill.loss=gkd)
    teacher_logprobs: torch.Tensor | None = None  # (B, T, k) f32: their log-probs under the teacher

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_rollout(cls, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                     rollout_logprobs: list[list[float]] | None = None) -> Experience:
        seqs = [p + r for p, r in zip(prompts, responses)]
        L = max(1, max(len(s) for s in seqs))
        sequences = torch.full((len(seqs), L), pad_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            sequences[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        exp = cls(sequences, torch.tensor([len(p) for p in prompts]), torch.tensor([len(r) for r in responses]),
                  pad_id, index=torch.arange(len(seqs)))
        if rollout_logprobs is not None:
            exp.rollout_logprobs = exp.pad_responses(rollout_logprobs)
        return exp

    def pad_responses(self, rows: list[list[float]]) -> torch.Tensor:
        """Per-row response values -> (B, T) float32, 0 past each row's end."""
        out = torch.zeros(len(rows), self.T)
        for b, r in enumerate(rows):
            out[b, :len(r)] = torch.tensor(r, dtype=torch.float32)
        return out

    # ---------------------------------------------------------------------------------- shapes
    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def T(self) -> int:
        """Response columns: the longest response, at least 1 (so empty responses still have a column)."""
        return max(1, int(self.response_lens.max())) if len(self) else 1

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, T) float32: 1 on real response tokens."""
        return (torch.arange(self.T)[None, :] < self.response_lens[:, None]).float()

    @property
    def policy_mask(self) -> torch.Tensor:
        """(B, T) float32: the tokens the losses and advantages count: `action_mask` within the response."""
        mask = self.response_mask
        return mask if self.action_mask is None else mask * self.action_mask[:, :mask.shape[1]]

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, L) int64: 1 on prompt and response tokens, 0 on padding."""
        L = self.sequences.shape[1]
        return (torch.arange(L)[None, :] < (self.prompt_lens + self.response_lens)[:, None]).long()

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, T) int64: response token j of row b in column j (pad_id past the end)."""
        pos = (self.prompt_lens[:, None] + torch.arange(self.T)[None, :]).clamp(max=self.sequences.shape[1] - 1)
        ids = self.sequences.gather(1, pos)
        return ids.masked_fill(self.response_mask == 0, self.pad_id)

    @property
    def gather_index(self) -> torch.Tensor:
        """(B, T) int64: the sequence position whose output predicts (and whose hidden state values)
        response token j: P_b + j - 1."""
        return (self.prompt_lens[:, None] - 1 + torch.arange(self.T)[None, :]).clamp(
            min=0, max=self.sequences.shape[1] - 1)

    # ------------------------------------------------------------------------------- slicing
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def select(self, rows: list[int] | torch.Tensor) -> Experience:
        """These rows, trimmed to the longest sequence and response among them (less padding to compute)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        picked = {k: v[rows] for k, v in self._tensors().items()}
        out = dataclasses.replace(self, **picked)
        L = max(1, int((out.prompt_lens + out.response_lens).max())) if len(rows) else 1
        T = out.T
        out.sequences = out.sequences[:, :L]
        for name in PER_TOKEN:
            if getattr(out, name) is not None:
                setattr(out, name, getattr(out, name)[:, :T])
        return out

    def __getitem__(self, sl: slice) -> Experience:
        """Contiguous rows, shapes kept (WorkerGroup.submit_sharded cuts each rank's share so)."""
        return dataclasses.replace(self, **{n: v[sl] for n, v in self._tensors().items()})

    def with_fields(self, **fields: torch.Tensor | None) -> Experience:
        return dataclasses.replace(self, **fields)

    # ----------------------------------------------------------------------------- transport
    def __reduce__(self):
        arrays = {n: v.contiguous().numpy() for n, v in self._tensors().items()}
        return _rebuild, (self.pad_id, arrays)


PER_TOKEN = ("rollout_logprobs", "old_logprobs", "ref_logprobs", "values", "advantages", "returns", "action_mask",
             "teacher_ids", "teacher_logprobs")


def _rebuild(pad_id: int, arrays: dict) -> Experience:
    with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        tensors = {n: torch.from_numpy(a) for n, a in arrays.items()}
    return Experience(pad_id=pad_id, **tensors)


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-rank (b_r, T_r, ...) results -> (sum b_r, max T_r, ...), right-padded with 0 along T."""
    T = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, T - p.shape[1])) for p in parts])
