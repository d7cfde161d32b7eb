"""A rank's share of a streamed dataset (`data.streaming=true`), read a step at a time, with a position
that a checkpoint saves and a resumed run restores.

    stream = RankStream(ds, rank, world)    # ds: the IterableDataset build_dataset returns
    rows = stream.take(8)                   # this rank's next 8 samples
    state = stream.state_dict()             # JSON-safe; RankStream(ds, rank, world).load_state_dict(state)
                                            # continues with exactly the samples that would have come next

Sharding is `datasets.distributed.split_dataset_by_node`: whole files per rank when their number divides
the world size, otherwise every rank reads the stream and keeps one sample in `world`. The position is
the dataset's own `state_dict` (shard, offset in the shard, and the mixing RNG), so a resume reads on
from there instead of replaying the stream. Nothing has a length: when a rank's share ends, it starts
its next pass (`set_epoch`, which reshuffles the shard order), and the run ends at train.max_steps.
"""

from __future__ import annotations

import datasets
from datasets.distributed import split_dataset_by_node

from rlhf_system.data.sources import DataError


class RankStream:
    def __init__(self, ds: datasets.IterableDataset, rank: int = 0, world: int = 1, name: str = "the streamed data"):
        # A new dataset object even for one rank: positions and epochs are set on it, not on the caller's.
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        self.rank, self.name = rank, name
        self.epoch = 0
        self._it = None
        self._restored = None  # a loaded position not yet read from: state_dict returns it as it is

    def take(self, n: int) -> list[dict]:
        """The next n samples of this rank's share, starting its next pass when it runs out."""
        rows: list[dict] = []
        empty_pass = False  # a pass from the start that yields nothing would loop forever
        while len(rows) < n:
            if self._it is None:
                self._it, empty_pass = iter(self.ds), self._restored is None
            try:
                rows.append(next(self._it))
                empty_pass = False
            except DataError:
                raise
            except StopIteration:  # the end of this pass (a restored position may sit right at it)
                if empty_pass:
                    raise DataError(f"rank {self.rank}'s share of the streamed data is empty") from None
                self.epoch += 1
                self.ds.set_epoch(self.epoch)
                self.close()
                self._restored = None
            except Exception as e:  # the datasets pipeline's own errors: one line naming the data
                first = (str(e).splitlines() or [""])[0][:300]
                raise DataError(f"{self.name}: reading the stream failed (rank {self.rank}, pass {self.epoch}): "
                                f"{type(e).__name__}: {first}. Fix: check the rows near there, or run once "
                                "with data.streaming=false, which checks every row before training") from None
        return rows

    def state_dict(self) -> dict:
        """Where the stream stands after the last sample taken."""
        if self._it is None:
            return {"epoch": self.epoch, "dataset": self._restored}
        return {"epoch": self.epoch, "dataset": self.ds.state_dict()}

    def close(self) -> None:
        """Ends the live read. datasets prefetches each mixed source's next sample on a thread, and the
        position it advances lives on iterables that every dataset split from the same one shares, so a
        read left open can move the position a new read starts from. Hence one read at a time: close
        (or load_state_dict, which closes) before another stream over the same data starts reading."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()  # runs datasets' own cleanup: waits for the prefetch threads, shuts their pool

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.epoch = state["epoch"]
        self.ds.set_epoch(self.epoch)
        if state["dataset"] is not None:
            self.ds.load_state_dict(state["dataset"])
        self._it, self._restored = None, state["dataset"]


def sources(data_sources) -> str:
    """How an error names a run's streamed sources: their paths."""
    return ", ".join(s.path for s in data_sources) or "the streamed data"


def materialise(ds, limit: int = 0) -> list[dict]:
    """A held-out set read into a list (evaluation indexes it): the first `limit` samples, or all."""
    if not isinstance(ds, datasets.IterableDataset):
        return ds
    return list(ds.take(limit) if limit else ds)
