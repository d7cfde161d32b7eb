"""DPOWorker: direct preference optimisation (DPO, IPO / cDPO / RPO) on one rank, under DeepSpeed.

Verbs: `setup`, `train_step`, `evaluate`, `save_hf`, `full_state_dict`; trainers/dpo.py (the
controller) decides when. In-process (LocalGroup) or as a Ray actor (WorkerGroup), the same code.

Two models live in each actor worker: the policy (model.path) under `train_engine`, and a frozen
reference (model.reference_path, empty -> model.path) under `frozen_engine`, so the reference can be
ZeRO-3 sharded (deepspeed.frozen_zero_stage=3) and/or CPU-offloaded (deepspeed.frozen_offload).
With peft (LoRA / QLoRA) only the policy gets adapters; the reference is loaded in full precision.

Reference log-probs, live or precomputed (algorithm.dpo.precompute_reference):
- live: the reference forwards every training micro-batch; it holds a second copy of the weights
  (or its ZeRO-3 shard) for the whole run and costs a no-grad forward per micro-batch.
- precomputed: at setup every rank scores its strided share of the train and eval pairs once, the
  shares are combined so that every rank holds both (N, 2) tables (8 bytes per pair, keyed by dataset
  index), and the reference is freed before training. Peak memory then never holds both models during
  training and a step skips the reference forward; the price is one pass over the data up front, and
  the reference can no longer change during the run (which DPO does not do anyway).

Loss normalisation: the DPO loss is per pair, so every optimiser step is the mean over the pairs of
the WHOLE global batch, however it is split into micro-batches and ranks: a micro-batch's loss is
summed over its pairs and scaled so that DeepSpeed's 1/accumulation and rank averaging leave
sum / global pairs. The optional NLL term (RPO, algorithm.dpo.nll_coef) is made per pair as well: the
length-normalised NLL of each chosen response (the paper's normalisation), not `dpo_nll`'s token mean
over the micro-batch, which would weigh tokens by how the batch happens to be split.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from rlhf_system.algorithms.logprobs import masked_mean, shifted_logprobs
from rlhf_system.algorithms.losses import dpo_loss, sequence_logps
from rlhf_system.config import RunConfig
from rlhf_system.data.batching import checked_total_steps
from rlhf_system.data.collate import pad_to
from rlhf_system.data.rank_data import RankData
from rlhf_system.distributed.deepspeed import (
    frozen_engine,
    grad_accum_steps,
    train_engine,
)
from rlhf_system.distributed.devices import all_reduce_sum
from rlhf_system.models.export import export_model
from rlhf_system.models.load import load_causal_lm, load_tokenizer
from rlhf_system.workers.base import BaseWorker
from rlhf_system.workers.supervised import (
    eval_size,
    grad_norm_of,
    optimizer_step,
    strided_shares,
    strided_sums,
)

UNIT = "preference pairs"
SUM_KEYS = ("loss", "reward_accuracy", "reward_margin", "logp_margin", "chosen_logp")  # pair_losses' sums


def reference_path(cfg: RunConfig) -> str:
    return cfg.model.reference_path or cfg.model.path


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> 2B right-padded rows, chosen first: input_ids, attention_mask, loss_mask (2B, L).

    Chosen and rejected go through one forward: one padded batch instead of two calls.
    """
    seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    masks = [r["chosen_loss_mask"] for r in rows] + [r["rejected_loss_mask"] for r in rows]
    return {"input_ids": pad_to(seqs, pad_id), "attention_mask": pad_to([[1] * len(s) for s in seqs], 0),
            "loss_mask": pad_to(masks, 0)}


def forward_logps(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (2B, L-1) and their response mask (2B, L-1) of a `collate_pairs` batch."""
    device = engine.device
    ids = batch["input_ids"].to(device)
    logits = engine(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
    return shifted_logprobs(logits, ids), batch["loss_mask"][:, 1:].to(device)


def split_pairs(seq: torch.Tensor) -> torch.Tensor:
    """(2B,) chosen-then-rejected sequence log-probs -> (B, 2) [chosen, rejected]."""
    return torch.stack(seq.chunk(2), dim=1)


class DPOWorker(BaseWorker):
    """One rank's DPO: cfg, tokenizer, data (its training share and the held-out pairs), engine (the policy,
    under train_engine), ref_engine (the frozen reference; None once its log-probs are precomputed),
    ref_train / ref_eval ((N, 2) reference [chosen, rejected] log-probs by dataset index, or None),
    total_steps."""

    def setup(self, cfg: RunConfig) -> dict:
        """Per-rank set-up inside a worker whose process group is already initialised."""
        self.cfg, self.tokenizer = cfg, load_tokenizer(cfg.model)
        self.data = RankData("preference", cfg, self.tokenizer, self.rank, self.world_size)
        self.total_steps = checked_total_steps(cfg, self.data.n_train, UNIT)
        self.ref_engine = frozen_engine(lambda: load_causal_lm(cfg.model, reference_path(cfg)), cfg, dp_size=self.world_size)
        self.ref_train = self.ref_eval = None
        if cfg.algorithm.dpo.precompute_reference:
            # Before the policy exists: the two models are never in memory together.
            if self.data.eval is not None:
                self.ref_eval = self.reference_table(self.data.eval, eval_size(self.cfg, len(self.data.eval)))
            if self.data.stream is None:  # a stream has no end to score up to: its pairs are scored per step
                self.ref_train = self.reference_table(self.data.train, self.data.n_train)
                self.ref_engine = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every launch mode
        self.engine = train_engine(lambda: load_causal_lm(cfg.model, peft=cfg.peft), cfg, dp_size=self.world_size,
                                   total_steps=self.total_steps)
        return {"train_samples": self.data.n_train, "total_steps": self.total_steps}

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tok, mask = forward_logps(self.ref_engine, batch)
        return split_pairs(sequence_logps(tok, mask)).float().cpu()

    def shares(self, n: int) -> list[list[int]]:
        """This rank's strided micro-batches of [0, n) (supervised.strided_shares)."""
        return strided_shares(n, self.cfg.train.micro_batch_size, self.rank, self.world_size)

    def reference_table(self, ds, n: int) -> torch.Tensor:
        """(n, 2) reference log-probs of pairs [0, n) of `ds`, on every rank.

        Each rank scores its strided share; the shares are disjoint, so a SUM all-reduce of tables that
        are zero elsewhere is an all-gather without the uneven-size bookkeeping.
        """
        table = torch.zeros(n, 2, dtype=torch.float64)
        pad = self.tokenizer.pad_token_id
        for idx in self.shares(n):
            logps = self.reference_logps(collate_pairs([ds[i] for i in idx or [0]], pad))
            if idx:
                table[idx] = logps.double()
        return all_reduce_sum(table, self.ref_engine.device).float()

    def pair_losses(self, batch: dict[str, torch.Tensor], ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch of B pairs -> (its loss summed over the pairs () with grad, sums (5,)).

        ref (B, 2): the reference [chosen, rejected] log-probs of the same pairs. `sums` (float64, CPU,
        detached) holds the sums over the pairs of the quantities SUM_KEYS names, for the caller to
        reduce over micro-batches and ranks and divide by the pair count.
        """
        d = self.cfg.algorithm.dpo
        tok, mask = forward_logps(self.engine, batch)
        pi = split_pairs(sequence_logps(tok, mask))
        ref = ref.to(pi.device)
        n = pi.shape[0]
        loss, m = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], d.beta, d.loss, d.label_smoothing)
        loss = loss * n  # dpo_loss is a mean over these pairs; sum, to normalise by the global batch
        if d.nll_coef > 0:
            # Per-pair, length-normalised NLL of the chosen response (the first B rows), summed over pairs.
            loss = loss + d.nll_coef * masked_mean(-tok[:n], mask[:n], dim=-1).sum()
        with torch.no_grad():
            sums = torch.stack([loss, m["reward_accuracy"] * n, m["reward_margin"] * n,
                                (pi[:, 0] - pi[:, 1]).sum(), pi[:, 0].sum()]).double().cpu()
        return loss, sums



    def train_step(self, batch_idx: list[int] | None, step: int) -> dict:
        """One optimiser step on the global batch `batch_idx` (dataset indices; None: the next from the stream)."""
        pad = self.tokenizer.pad_token_id
        pairs = self.cfg.train.global_batch_size
        scale = grad_accum_steps(self.cfg, self.world_size) * self.world_size / pairs

        def loss_of(micro):
            batch = collate_pairs(micro.rows, pad)
            ref = self.ref_train[micro.indices] if self.ref_train is not None else self.reference_logps(batch)
            loss, sums = self.pair_losses(batch, ref)
            # SUM_KEYS, then the chosen + rejected tokens, padding excluded (throughput)
            return loss, torch.cat([sums, batch["attention_mask"].sum().double().reshape(1)])

        shares = self.data.micro_batches(batch_idx)
        sums = optimizer_step(self.engine, [(m.where, m) for m in shares], loss_of, scale, "DPO", step, self.rank)
        mean = (sums / pairs).tolist()
        return {"loss": mean[0], "reward_accuracy": mean[1], "reward_margin": mean[2], "lr": self.engine.get_lr()[0],
                "pairs": pairs, "tokens": int(sums[len(SUM_KEYS)])} | grad_norm_of(self.engine)

    def evaluate(self) -> dict:
        """Held-out pairs, each rank a strided share (supervised.py).

        eval_logp_margin: the policy's chosen-minus-rejected summed response log-prob, mean over pairs;
        eval_reward_accuracy / eval_reward_margin: DPO's implicit reward beta * (policy - reference) of
        chosen vs rejected (accuracy counts ties as wrong, so it is 0 while policy == reference);
        eval_loss: the training objective on these pairs; eval_chosen_logp: mean chosen log-prob, which
        shows whether DPO is pushing the chosen response down too (the failure RPO's NLL term addresses).
        """
        if self.data.eval is None:
            return {}
        self.engine.eval()
        n = eval_size(self.cfg, len(self.data.eval))
        pad = self.tokenizer.pad_token_id

        def score(idx: list[int]) -> torch.Tensor:
            batch = collate_pairs([self.data.eval[i] for i in idx], pad)
            ref = self.ref_eval[idx] if self.ref_eval is not None else self.reference_logps(batch)
            return self.pair_losses(batch, ref)[1]

        sums = strided_sums(self.engine, self.shares(n), score, len(SUM_KEYS))
        self.engine.train()
        mean = (sums / max(n, 1)).tolist()
        return {"eval_loss": mean[0], "eval_reward_accuracy": mean[1], "eval_reward_margin": mean[2],
                "eval_logp_margin": mean[3], "eval_chosen_logp": mean[4]}

    def save_hf(self, out: str | Path) -> Path:
        return export_model(self.engine, self.tokenizer, out, self.cfg)
