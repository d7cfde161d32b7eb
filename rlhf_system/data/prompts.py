"""The PPO controller's training prompts, one step's worth at a time.

    prompts = StepPrompts(ds, cfg)      # ds: build_dataset("prompt", ...), map-style or streamed
    rows = prompts.next()               # train.rollout_batch_size rows: prompt_ids, messages, meta
    state = prompts.state_dict()        # into the run state; load_state_dict(state) on resume

Only the step's rows become Python objects. Map-style prompts stay in their memory-mapped Arrow cache
and are read by the epoch's shuffled batch order (data/batching.py, `seed + epoch`); a stream
(`data.streaming=true`) is read on from its saved position (data/stream.py).
"""

from __future__ import annotations

import json

from rlhf_system.data.batching import global_batches
from rlhf_system.data.stream import RankStream


def prompt_row(r: dict) -> dict:
    """A tokenised prompt row as the PPO step uses it: prompt_ids, messages (the turns), meta (the
    source's other keys, with the reference answer), for the rollout and the reward functions."""
    return {"prompt_ids": r["prompt_ids"], "messages": json.loads(r["messages"]),
            "meta": {**json.loads(r["meta"]), "answer": r["answer"]}}


class StepPrompts:
    def __init__(self, ds, batch: int, seed: int, streaming: bool, name: str = "the streamed prompts"):
        self.batch, self.seed = batch, seed
        self.stream = RankStream(ds, name=name) if streaming else None
        self.ds = None if streaming else ds
        self.epoch, self.position = 0, 0
        self._order: list[list[int]] | None = None  # this epoch's batches of indices

    @property
    def per_epoch(self) -> int | None:
        """Steps in one pass over map-style prompts; None for a stream."""
        return None if self.stream else len(self.ds) // self.batch

    def next(self) -> list[dict]:
        if self.stream is not None:
            rows = self.stream.take(self.batch)
        else:
            if self.position >= self.per_epoch:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            if self._order is None:
                self._order = global_batches(len(self.ds), self.batch, self.seed, self.epoch)
            rows = self.ds.select(self._order[self.position])
        self.position += 1
        return [prompt_row(r) for r in rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position,
                "stream": self.stream.state_dict() if self.stream else None}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
        if self.stream is not None:
            if state.get("stream") is None:
                from rlhf_system.config import ConfigError

                raise ConfigError("the checkpoint holds no prompt-stream position (it was written without "
                                  "data.streaming); resume with the data settings it was written with")
            self.stream.load_state_dict(state["stream"])
