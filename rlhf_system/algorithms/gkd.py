"""GKD's divergence between a teacher's and a student's next-token distributions, computed on the
teacher's k most likely tokens (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes"; `beta` as TRL's GKDTrainer reads it).

Why top-k: the exact divergence needs both whole distributions at every position, and the teacher lives
in another process (the reference role): a (B, T, V) tensor per micro-batch would cross Ray (8 x 1024 x
152k floats = 5 GB). The teacher sends its top-k token ids and log-probs instead, (B, T, k), and both
distributions are coarse-grained to k + 1 buckets: those k tokens, and one for the rest of the
vocabulary. A divergence of the coarse-grained distributions is a lower bound of the whole one (the data
processing inequality), equal to it when the k tokens hold all the mass; with k = V it is exact.

Pure torch: no model, no process. Shapes: B rows, T response positions, V vocabulary, k kept tokens.
"""

from __future__ import annotations

import math

import torch

from rlhf_system.algorithms.logprobs import DEFAULT_CHUNK

# The rest bucket's floor: where the k tokens hold (numerically) all the mass, log 0 would be -inf and
# 0 * -inf a NaN; 1e-12 of mass weighs nothing in either direction's sum.
_TINY = 1e-12


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0,
                  chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens at each position and their log-probs at `temperature`:
    logits (B, T, V) -> ids (B, T, k) int64, log-probs (B, T, k) float32, most likely first. Chunked
    by positions as logprobs._per_position is, so no (B, T, V) float32 copy is made."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, V={logits.shape[-1]}], got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T = logits.shape[:2]
    ids = torch.zeros(B, T, k, dtype=torch.long, device=logits.device)
    lps = torch.zeros(B, T, k, dtype=torch.float32, device=logits.device)
    for b in range(B):
        for t0 in range(0, T, chunk_size):
            z = logits[b, t0:t0 + chunk_size].float() / temperature
            top = z.topk(k, dim=-1)
            ids[b, t0:t0 + chunk_size] = top.indices
            lps[b, t0:t0 + chunk_size] = top.values - torch.logsumexp(z, dim=-1, keepdim=True)
    return ids, lps


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (B, T, k) of the tokens `ids` (B, T, k) under logits (B, T, V) at `temperature`,
    differentiable (the student's side of the loss)."""
    if ids.shape[:2] != logits.shape[:2]:
        raise ValueError(f"ids {tuple(ids.shape)} must match logits {tuple(logits.shape)} in (B, T)")
    z = logits.float() / temperature
    return z.gather(-1, ids.to(z.device)) - torch.logsumexp(z, dim=-1, keepdim=True)


def with_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """(..., k) log-probs of k tokens -> (..., k + 1): the k, then the log of the mass left to every
    other token, log(1 - sum p), floored at 1e-12 of mass."""
    rest = -torch.expm1(torch.logsumexp(logprobs, dim=-1, keepdim=True))
    return torch.cat([logprobs, torch.log(rest.clamp(min=_TINY))], dim=-1)


def generalized_jsd(teacher: torch.Tensor, student: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence per position, over the last dimension of two
    log-prob tensors of the same shape (distributions over the same buckets): (..., n) x 2 -> (...).

    beta = 0: the forward KL(teacher || student) (mode covering: what supervised KD minimises);
    beta = 1: the reverse KL(student || teacher) (mode seeking: what on-policy distillation's sampled
    reward estimates); in between, with the mixture m = beta * teacher + (1 - beta) * student,
    beta * KL(teacher || m) + (1 - beta) * KL(student || m). Gradients flow through `student` only."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} must have one shape")
    teacher = teacher.detach()
    if beta == 0.0:
        return (teacher.exp() * (teacher - student)).sum(-1)
    if beta == 1.0:
        return (student.exp() * (student - teacher)).sum(-1)
    mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1 - beta)]), dim=0)
    return (beta * (teacher.exp() * (teacher - mixture)).sum(-1)
            + (1 - beta) * (student.exp() * (student - mixture)).sum(-1))


def topk_jsd(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """`generalized_jsd` of the teacher's top-k log-probs and the student's log-probs of the same k
    tokens, each with its rest bucket: (B, T, k) x 2 -> (B, T)."""
    return generalized_jsd(with_rest(teacher_logprobs.float()), with_rest(student_logprobs.float()), beta)
