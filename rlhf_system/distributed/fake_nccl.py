"""A CPU stand-in for vLLM's PyNcclCommunicator, so the NCCL branch of weight sync runs in CI.

This is a test double, not a transport anyone should pick: `rollout.sync_backend` does not offer it;
tests pass backend="fake_nccl" to WeightSync. Everything around the communicator is the real code
path: the real StatelessProcessGroup and TCPStore (with the actor's listening socket), the sync ranks
of every engine and tensor-parallel worker, the bucket buffers and the deadline in
`sync_transport._Link.finish`. What the fake replaces, it checks against the installed vLLM:

- every call binds to the real signature (`PyNcclCommunicator.__init__(group, device, library_path)`,
  `broadcast(tensor, src, stream)`), so a call the real class would reject fails here too;
- the group is a real StatelessProcessGroup and no two processes claim the same rank (NCCL would
  hang on that); the tensor is on the communicator's device, contiguous, and of a dtype NCCL maps
  (`ncclDataTypeEnum.from_torch`), as the real broadcast asserts;
- bytes travel over gloo on the same store, and like NCCL the sender's broadcast returns before
  the data has arrived: completion is seen only through `Event.query()`, which is how the real
  code waits for a CUDA stream. A receiver blocks until its bytes are in (on a GPU, later kernels
  on the stream would wait for them).
"""

from __future__ import annotations

import inspect

import torch

_PENDING: list = []  # this process's sends not yet known to be complete (what a CUDA stream would hold)


def _real():
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

    return PyNcclCommunicator


class PyNcclCommunicator:
    def __init__(self, group, device, library_path=None):
        from vllm.distributed.utils import StatelessProcessGroup

        inspect.signature(_real().__init__).bind(self, group, device=device, library_path=library_path)
        if not isinstance(group, StatelessProcessGroup):
            raise TypeError(f"fake PyNcclCommunicator: the weight-sync group must be a StatelessProcessGroup, "
                            f"got {type(group).__name__}")
        if not 0 <= group.rank < group.world_size:
            raise ValueError(f"fake PyNcclCommunicator: rank {group.rank} outside world {group.world_size}")
        claimed = group.store.add(f"fake_nccl/rank{group.rank}", 1)
        if claimed != 1:
            raise RuntimeError(f"fake PyNcclCommunicator: two processes joined as rank {group.rank} "
                               "(NCCL would hang): the rank offsets overlap")
        self.rank, self.world_size, self.group = group.rank, group.world_size, group
        self.device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        self.broadcasts = 0
        # ProcessGroupGloo on the group's own store (its keys prefixed apart), as NCCL would use its own comm
        store = torch.distributed.PrefixStore("fake_nccl_comm", group.store)
        # the store's deadline: a receiver blocked on a broadcast whose sender is gone fails then (on a GPU
        # its kernel would wait, and the event poll in sync_transport would end it at the same deadline)
        self._pg = torch.distributed.ProcessGroupGloo(store, group.rank, group.world_size, group.store.timeout)

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None):
        from vllm.distributed.device_communicators.pynccl_wrapper import ncclDataTypeEnum

        inspect.signature(_real().broadcast).bind(self, tensor, src, stream=stream)
        assert tensor.device == self.device, (f"this nccl communicator is created to work on {self.device}, "
                                              f"but the input tensor is on {tensor.device}")
        assert tensor.is_contiguous(), "NCCL broadcasts a contiguous buffer"
        ncclDataTypeEnum.from_torch(tensor.dtype)  # raises for a dtype NCCL cannot carry
        if not 0 <= src < self.world_size:
            raise ValueError(f"fake PyNcclCommunicator: src {src} outside world {self.world_size}")
        work = self._pg.broadcast(tensor, src)
        self.broadcasts += 1
        if self.rank == src:
            _PENDING.append(work)  # asynchronous, as on a CUDA stream
        else:
            work.wait()

    def destroy(self) -> None:
        _PENDING.clear()
        self._pg = None


class Event:
    """torch.cuda.Event's record/query, over the fake's pending sends."""

    def __init__(self, *args, **kwargs):
        self._works: list = []

    def record(self, stream=None) -> None:
        self._works = list(_PENDING)

    def query(self) -> bool:
        done = all(w.is_completed() for w in self._works)
        if done:
            for w in self._works:
                if w in _PENDING:
                    _PENDING.remove(w)
        return done
