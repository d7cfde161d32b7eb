"""Instruction tuning (SFT): next-token loss on assistant tokens only, under DeepSpeed.

    rlhf train sft --config configs/sft/tiny-cpu.yaml [overrides]

Reads top to bottom: setup (tokenizer, data, model, engine) -> train (global batches split into
micro-batches per data-parallel rank) -> evaluate (held-out loss, perplexity) -> save (HF format).
It runs in-process as rank 0 of 1, or on every rank of a process group (the Ray WorkerGroup calls
the same functions on each worker).

Loss normalisation: every optimiser step is the token-level mean of the WHOLE global batch, however it
is split into micro-batches and ranks (see algorithms.losses.sft_loss_sum), so a global batch gives
the same update on 1 process or on N, with any micro-batch size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rlhf_system.algorithms.losses import sft_loss_sum
from rlhf_system.config import RunConfig
from rlhf_system.data.build import build_dataset
from rlhf_system.data.collate import collate_packed, collate_sft
from rlhf_system.distributed.deepspeed import dist_init, grad_accum_steps, train_engine
from rlhf_system.models.load import load_causal_lm, load_tokenizer
from rlhf_system.tracking import Tracker


@dataclass
class SFTState:
    cfg: RunConfig
    tokenizer: object
    train_ds: object
    eval_ds: object | None
    engine: object
    rank: int
    world: int
    total_steps: int
    tracker: Tracker


# ------------------------------------------------------------------------------------------ setup
def setup(cfg: RunConfig) -> SFTState:
    tokenizer = load_tokenizer(cfg.model)  # fails fast on a bad path, before data or model work
    name = cfg.model.tokenizer_path or cfg.model.path
    train_ds, _ = build_dataset("sft", cfg.data, cfg.data.train, tokenizer, cfg.seed, name)
    eval_ds = build_dataset("sft", cfg.data, cfg.data.eval, tokenizer, cfg.seed, name)[0] if cfg.data.eval else None
    dist_init()
    rank, world = dist.get_rank(), dist.get_world_size()
    steps_per_epoch = len(train_ds) // cfg.train.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"data.train has {len(train_ds)} samples, fewer than train.global_batch_size="
                         f"{cfg.train.global_batch_size}. Fix: lower the global batch or add data")
    total = steps_per_epoch * cfg.train.epochs
    total = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(cfg.model)
    engine = train_engine(model, cfg, dp_size=world, total_steps=total)
    if rank == 0:
        cfg.dump(Path(cfg.run_dir) / "config.yaml")
    tracker = Tracker(cfg.run_dir, enabled=rank == 0, total_steps=total, console=cfg.logging.console)
    return SFTState(cfg, tokenizer, train_ds, eval_ds, engine, rank, world, total, tracker)


# ---------------------------------------------------------------------------------------- batches
def global_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled sample indices grouped into global batches (the last incomplete one is dropped)."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]


def rank_micro_batches(batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    per_rank = len(batch) // world
    mine = batch[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro] for i in range(0, per_rank, micro)]


def collate(state: SFTState, rows: list[dict]) -> dict[str, torch.Tensor]:
    pad = state.tokenizer.pad_token_id
    if state.cfg.data.packing:
        return collate_packed(rows, pad, dtype=state.engine.module.dtype)
    return collate_sft(rows, pad)


def forward_sum(state: SFTState, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    device = state.engine.device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "loss_mask"}
    logits = state.engine(**inputs).logits
    return sft_loss_sum(logits, inputs["input_ids"], batch["loss_mask"].to(device))


# ------------------------------------------------------------------------------------------ train
def train_step(state: SFTState, batch_idx: list[int], step: int) -> dict:
    cfg = state.cfg
    micros = [collate(state, [state.train_ds[i] for i in mb])
              for mb in rank_micro_batches(batch_idx, state.rank, state.world, cfg.train.micro_batch_size)]
    # Trained tokens of the whole global batch, over all ranks: the loss denominator.
    tokens = torch.tensor(float(sum(int(m["loss_mask"][:, 1:].sum()) for m in micros)))
    dist.all_reduce(tokens)
    # DeepSpeed divides each micro loss by the accumulation steps and averages gradients over
    # ranks; scaling by gas * world undoes both, leaving sum(NLL) / global tokens.
    scale = grad_accum_steps(cfg, state.world) * state.world / tokens.clamp(min=1)
    total = torch.zeros(())
    for m in micros:
        nll_sum, _ = forward_sum(state, m)
        if not torch.isfinite(nll_sum):
            raise FloatingPointError(f"non-finite SFT loss at step {step}, samples {batch_idx[:8]}...: "
                                     f"{nll_sum.item()}. Fix: lower optim.lr or check the data")
        state.engine.backward(nll_sum * scale)
        state.engine.step()
        total += nll_sum.detach().float().cpu()
    dist.all_reduce(total)
    loss = (total / tokens.clamp(min=1)).item()
    return {"loss": loss, "lr": state.engine.get_lr()[0], "tokens": int(tokens)}


@torch.no_grad()
def evaluate(state: SFTState) -> dict:
    """Held-out token-level loss and perplexity over this rank's shard, reduced over ranks."""
    if state.eval_ds is None:
        return {}
    state.engine.eval()
    n = len(state.eval_ds)
    if state.cfg.train.max_eval_samples:
        n = min(n, state.cfg.train.max_eval_samples)
    sums = torch.zeros(2)
    mb = state.cfg.train.micro_batch_size
    for start in range(state.rank * mb, n, mb * state.world):
        rows = [state.eval_ds[i] for i in range(start, min(start + mb, n))]
        nll_sum, count = forward_sum(state, collate(state, rows))
        sums += torch.stack([nll_sum.float().cpu(), count.float().cpu()])
    dist.all_reduce(sums)
    state.engine.train()
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def save_hf(state: SFTState, out: Path) -> Path:
    """Hugging Face export (safetensors); ZeRO-3 shards are gathered first."""
    import deepspeed

    model = state.engine.module
    params = list(model.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if state.cfg.deepspeed.zero_stage == 3 \
        else _null()
    with gather:
        if state.rank == 0:
            model.save_pretrained(out, safe_serialization=True)
            state.tokenizer.save_pretrained(out)
    dist.barrier()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run(cfg: RunConfig) -> dict:
    """The whole SFT run; returns the final metrics."""
    state = setup(cfg)
    t0 = time.perf_counter()
    step = 0
    first_eval = evaluate(state)
    state.tracker.log(0, first_eval)
    for epoch in range(cfg.train.epochs):
        for batch_idx in global_batches(len(state.train_ds), cfg.train.global_batch_size, cfg.seed, epoch):
            if step >= state.total_steps:
                break
            t = time.perf_counter()
            metrics = train_step(state, batch_idx, step)
            step += 1
            metrics["tokens_per_s"] = metrics["tokens"] / (time.perf_counter() - t)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics.update(evaluate(state))
            if step % cfg.logging.log_every == 0 or step == state.total_steps:
                state.tracker.log(step, metrics)
    final = evaluate(state)
    state.tracker.log(step, final)
    out = save_hf(state, Path(cfg.run_dir) / "hf") if cfg.checkpoint.export_hf else None
    return {"steps": step, "seconds": time.perf_counter() - t0, "initial": first_eval, "final": final,
            "export": str(out) if out else None}
