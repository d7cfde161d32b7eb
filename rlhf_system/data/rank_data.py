"""One rank's training and held-out samples, for the SFT, reward-model and DPO workers.

    data = RankData("sft", cfg, tokenizer, rank, world)
    for micro in data.micro_batches(batch):   # batch: the controller's dataset indices, or None
        ...                                    # micro.rows; micro.where names them in an error

Map-style data (the default) is indexed by the global batches the controller cuts (data/batching.py):
every rank could read any sample. With `data.streaming=true` there are no indices: the controller
sends None, and each rank takes its share of the global batch from its own part of the stream
(data/stream.py), whose position the rank's checkpoint keeps.
"""

from __future__ import annotations

from typing import NamedTuple

from rlhf_system.config import ConfigError
from rlhf_system.data.batching import rank_micro_batches
from rlhf_system.data.build import run_datasets
from rlhf_system.data.stream import RankStream, materialise, sources


class Micro(NamedTuple):
    rows: list[dict]
    where: str                          # names the samples in an error
    indices: list[int] | None = None    # dataset indices (map-style data only)


class RankData:
    def __init__(self, kind: str, cfg, tokenizer, rank: int, world: int):
        train, evals, _ = run_datasets(kind, cfg, tokenizer)  # cache hits: the controller tokenised first
        self.rank, self.world = rank, world
        self.noun = "pairs" if kind == "preference" else "samples"  # what errors call a row
        self.global_batch, self.micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
        self.stream = RankStream(train, rank, world, sources(cfg.data.train)) if cfg.data.streaming else None
        self.train = None if self.stream else train
        self.eval = materialise(evals, cfg.train.max_eval_samples) if evals is not None else None

    @property
    def n_train(self) -> int | None:
        """Training samples (packs, pairs), or None for a stream, which has no length."""
        return None if self.stream else len(self.train)

    def micro_batches(self, batch: list[int] | None) -> list[Micro]:
        """This rank's share of one global batch, cut into micro-batches."""
        if batch is None:
            rows = self.stream.take(self.global_batch // self.world)
            return [Micro(rows[i:i + self.micro], f"streamed {self.noun} {i}-{i + self.micro - 1} of this step")
                    for i in range(0, len(rows), self.micro)]
        shares = rank_micro_batches(batch, self.rank, self.world, self.micro)
        return [Micro([self.train[i] for i in mb], f"{self.noun} {mb} (dataset indices)", mb) for mb in shares]

    def state_dict(self) -> dict | None:
        """The stream's position (None for map-style data: the controller's (epoch, position) suffices)."""
        return {"world": self.world, "stream": self.stream.state_dict()} if self.stream else None

    def load_state_dict(self, state: dict | None, where: str) -> None:
        if self.stream is None:
            return
        if state is None:
            raise ConfigError(f"{where}: the checkpoint holds no stream position for rank {self.rank} (it was written "
                              "without data.streaming); resume with the data settings it was written with")
        if state["world"] != self.world:
            raise ConfigError(f"{where}: the stream positions were saved by {state['world']} ranks, and this run has "
                              f"{self.world}: each rank's share of the stream differs. Fix: resume on "
                              f"{state['world']} ranks")
        self.stream.load_state_dict(state["stream"])
