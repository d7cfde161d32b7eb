"""SFTWorker: instruction tuning on one rank: next-token loss on assistant tokens only, under DeepSpeed.
Verbs: `setup`, `train_step`, `evaluate`, `save_hf`, `full_state_dict`; trainers/sft.py (the controller)
decides when. In-process (LocalGroup) or as a Ray actor (WorkerGroup), the same code either way.

Loss normalisation: every optimiser step is the token-level mean of the WHOLE global batch, however it
is split into micro-batches and ranks (see algorithms.losses.sft_loss_sum), so a global batch gives
the same update on 1 process or on N, with any micro-batch size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhf_system.algorithms.losses import sft_loss_sum
from rlhf_system.config import RunConfig
from rlhf_system.data.batching import checked_total_steps
from rlhf_system.data.collate import collate_flat, collate_packed, collate_sft, packing_layout
from rlhf_system.data.rank_data import RankData
from rlhf_system.distributed.deepspeed import grad_accum_steps, train_engine
from rlhf_system.distributed.devices import all_reduce_sum
from rlhf_system.models.export import export_model
from rlhf_system.models.load import load_causal_lm, load_tokenizer
from rlhf_system.workers.base import BaseWorker
from rlhf_system.workers.supervised import eval_size, optimizer_step, strided_shares, strided_sums

UNIT = "samples (packs)"  # what data.train counts, for the too-small-for-one-batch error


class SFTWorker(BaseWorker):
    """One rank's SFT: cfg, tokenizer, data (its training share and the held-out set), engine (DeepSpeed),
    total_steps; rank and world_size from BaseWorker."""

    def setup(self, cfg: RunConfig) -> dict:
        """Per-rank set-up inside a worker whose process group is already initialised."""
        self.cfg, self.tokenizer = cfg, load_tokenizer(cfg.model)
        self.data = RankData("sft", cfg, self.tokenizer, self.rank, self.world_size)
        self.total_steps = checked_total_steps(cfg, self.data.n_train, UNIT)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every launch mode
        self.engine = train_engine(lambda: load_causal_lm(cfg.model, peft=cfg.peft), cfg, dp_size=self.world_size,
                                   total_steps=self.total_steps)
        return {"train_samples": self.data.n_train, "total_steps": self.total_steps}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if self.cfg.data.packing:
            if packing_layout(self.cfg.model.attn_implementation) == "flat":
                return collate_flat(rows)
            return collate_packed(rows, pad, dtype=self.engine.module.dtype)
        return collate_sft(rows, pad)

    def forward_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.engine.device
        inputs = {k: v.to(device) for k, v in batch.items() if k != "loss_mask"}
        # use_cache=False: training needs no KV cache, and with one transformers would not find the packed
        # samples' boundaries in the flat layout (it looks for restarting position ids only without a cache)
        logits = self.engine(**inputs, use_cache=False).logits
        return sft_loss_sum(logits, inputs["input_ids"], batch["loss_mask"].to(device))

    def train_step(self, batch_idx: list[int] | None, step: int) -> dict:
        """One optimiser step on the global batch `batch_idx` (dataset indices; None: the next from the stream)."""
        shares = self.data.micro_batches(batch_idx)
        micros = [self.collate(m.rows) for m in shares]
        # Trained tokens of the whole global batch, over all ranks: the loss denominator.
        tokens = all_reduce_sum(torch.tensor(float(sum(int(m["loss_mask"][:, 1:].sum()) for m in micros))), self.engine.device)
        # Real (non-padding) tokens processed, for throughput: packs count their samples' lengths.
        real = all_reduce_sum(torch.tensor(float(sum(sum(r.get("seq_lens") or [len(r["input_ids"])])
                                                     for m in shares for r in m.rows))), self.engine.device)
        scale = grad_accum_steps(self.cfg, self.world_size) * self.world_size / tokens.clamp(min=1)

        def loss_of(batch):
            nll_sum, _ = self.forward_sum(batch)
            return nll_sum, nll_sum.detach()

        total = optimizer_step(self.engine, [(m.where, b) for m, b in zip(shares, micros)], loss_of, scale, "SFT",
                               step, self.rank)
        loss = (total[0] / tokens.clamp(min=1).double()).item()
        return {"loss": loss, "lr": self.engine.get_lr()[0], "tokens": int(tokens), "input_tokens": int(real)}

    def evaluate(self) -> dict:
        """Held-out token-level loss and perplexity, each rank a strided share (supervised.py)."""
        if self.data.eval is None:
            return {}
        self.engine.eval()
        n = eval_size(self.cfg, len(self.data.eval))

        def score(idx: list[int]) -> torch.Tensor:
            nll_sum, count = self.forward_sum(self.collate([self.data.eval[i] for i in idx]))
            return torch.stack([nll_sum.float().cpu(), count.float().cpu()])

        sums = strided_sums(self.engine, strided_shares(n, self.cfg.train.micro_batch_size, self.rank,
                                                        self.world_size), score, 2)
        self.engine.train()
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def save_hf(self, out: str | Path) -> Path:
        return export_model(self.engine, self.tokenizer, out, self.cfg)
