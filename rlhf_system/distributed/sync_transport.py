"""The wire of weight sync: how each bucket's flat buffer gets from the actor to the engines' workers.
The order of calls and who drives them is in distributed/weight_sync.py; this file only moves bytes.

    sender = Sender.listen(backend, addr, world, timeout_s)        # actor rank 0: bound at once
    port = sender.port
    # concurrently: each sender rank `sender.connect(...)`, each engine worker `Receiver.join(...)`
    for buf in buckets:  sender.send(buf)              |   buf = receiver.recv(numel, dtype)
    sender.finish()                                     |   receiver.finish()
    sender.close()                                      |   receiver.close()

Backends (chosen by the controller from the config: weight_sync.sync_backend):
- gloo: CPU, engines on any host. ProcessGroupGloo broadcast from sync rank 0 on a TCPStore.
- nccl: GPUs, engines on their own devices. vLLM's PyNcclCommunicator on a StatelessProcessGroup
  (what vLLM's own weight-transfer engines use). Broadcasts are asynchronous on the current stream:
  `finish` polls a CUDA event against the deadline and aborts the communicator when it passes, so an
  engine that raised mid-sync leaves its peers an error, not a GPU spinning in a broadcast forever.
- fake_nccl: the nccl code path on CPU (distributed/fake_nccl.py: the communicator is replaced, the
  store, ranks, devices, streams and deadlines are not), so CI runs it end to end.
- ipc (GPU) / shm (CPU): engines colocated with the actor (the hybrid engine, placement.colocate).
  Two processes on one GPU cannot form an NCCL group, and need not copy bytes through one: each actor
  rank puts the bucket where its engine worker can map it (a CUDA IPC handle / a shared-memory file),
  publishes the handle on the store, and waits until the worker has mapped it. Only handles (tens of
  bytes) cross a socket.

Every wait has the deadline given at connect/join (`timeout_s`).
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import uuid
from datetime import timedelta

import torch

BROADCAST = ("gloo", "nccl", "fake_nccl")
MAPPED = ("ipc", "shm")


class TransportTimeout(RuntimeError):
    """A weight-sync transfer did not complete within its deadline."""


def _listening_socket(addr: str) -> socket.socket:
    """Bound and listening now, on a port the OS picks: no window between choosing a free port and
    binding it, in which another process can take it (a resumed run after a SIGKILLed one failed with
    EADDRINUSE that way)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 0))
    s.listen()
    return s


def _store(addr: str, port: int, is_master: bool, timeout_s: float, listen: socket.socket | None = None):
    kwargs = {"timeout": timedelta(seconds=timeout_s), "wait_for_workers": False, "use_libuv": False}
    if listen is not None:
        return torch.distributed.TCPStore(addr, port, None, True, master_listen_fd=listen.detach(), **kwargs)
    return torch.distributed.TCPStore(addr, port, None, is_master, **kwargs)


def _nccl_parts(backend: str):
    """(communicator class, this process's device, event class) for nccl or its CPU stand-in."""
    if backend == "fake_nccl":
        from rlhf_system.distributed import fake_nccl

        return fake_nccl.PyNcclCommunicator, torch.device("cpu"), fake_nccl.Event
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

    return PyNcclCommunicator, torch.device("cuda", torch.cuda.current_device()), torch.cuda.Event


class _Link:
    """One side's connection: the group (broadcast backends) or the store (mapped backends)."""

    def __init__(self, backend: str, rank: int, world: int, timeout_s: float):
        self.backend, self.rank, self.world, self.timeout_s = backend, rank, world, timeout_s
        self.comm = self.store = self.event_cls = None
        self.device = torch.device("cpu")
        self.wire_bytes = 0  # bytes this side put on or took off a socket for mapped backends (handles only)

    def _connect(self, addr: str, port: int, listen: socket.socket | None) -> None:
        if self.backend == "gloo":
            self.store = _store(addr, port, self.rank == 0, self.timeout_s, listen)
            self.comm = torch.distributed.ProcessGroupGloo(self.store, self.rank, self.world,
                                                           timedelta(seconds=self.timeout_s))
        elif self.backend in ("nccl", "fake_nccl"):
            from vllm.distributed.utils import StatelessProcessGroup

            comm_cls, self.device, self.event_cls = _nccl_parts(self.backend)
            pg = StatelessProcessGroup.create(host=addr, port=port, rank=self.rank, world_size=self.world,
                                              store_timeout=int(self.timeout_s), listen_socket=listen)
            self.store = pg.store
            self.comm = comm_cls(pg, device=self.device)
        else:
            self.store = _store(addr, port, listen is not None, self.timeout_s, listen)
            self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "ipc" else self.device

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.backend == "gloo":
            self.comm.broadcast(tensor, 0).wait()
        else:  # PyNccl: enqueued on the current stream; `finish` waits for it under the deadline
            self.comm.broadcast(tensor, src=0)

    def finish(self) -> None:
        """Wait, under the deadline, until this side's transfers are complete."""
        if self.backend in ("nccl", "fake_nccl"):
            event = self.event_cls()
            event.record()
            deadline = time.monotonic() + self.timeout_s
            while not event.query():
                if time.monotonic() > deadline:
                    self.close()  # abort the communicator: the broadcast will never complete
                    raise TransportTimeout(f"weight sync ({self.backend}): the broadcasts did not complete within "
                                           f"{self.timeout_s:g}s (a peer stopped mid-sync)")
                time.sleep(0.005)
        elif self.backend == "ipc":
            torch.cuda.ipc_collect()  # free what the engines have released

    def close(self) -> None:
        if self.comm is not None and hasattr(self.comm, "destroy"):
            self.comm.destroy()
        self.comm = self.store = None


class Sender(_Link):
    """An actor rank's side. Broadcast backends: only actor rank 0 (sync rank 0) sends. Mapped backends:
    every actor rank r sends its own copy to the engine workers mapped from it (`sources`)."""

    def __init__(self, backend: str, rank: int, world: int, timeout_s: float):
        super().__init__(backend, rank, world, timeout_s)
        self._listen: socket.socket | None = None  # rank 0's bound socket until the store takes it
        self._files: list[str] = []               # shared-memory files published and not yet unlinked
        self.receivers: list[int] = []
        self.sent = 0

    @classmethod
    def listen(cls, backend: str, addr: str, world: int, timeout_s: float) -> Sender:
        s = cls(backend, 0, world, timeout_s)
        s._listen = _listening_socket(addr)
        s.port = s._listen.getsockname()[1]
        return s

    def connect(self, addr: str, port: int, rank: int = 0, receivers: list[int] | None = None) -> None:
        """Rendezvous (blocks until the receivers join, for broadcast backends). `receivers`: for mapped
        backends, the sync ranks of the engine workers that map this rank's buckets."""
        self.rank, self.receivers, self.sent = rank, receivers or [], 0
        self._connect(addr, port, self._listen)
        self._listen = None

    def send(self, buf: torch.Tensor) -> None:
        if self.backend in BROADCAST:
            self._broadcast(buf)
        else:
            self._publish(buf)
        self.sent += 1

    def _publish(self, buf: torch.Tensor) -> None:
        """Map `buf` for this rank's engine workers, publish the handle, wait until each has mapped it."""
        i = self.sent
        if self.backend == "ipc":
            from torch.multiprocessing.reductions import reduce_tensor

            _, args = reduce_tensor(buf)
            handle = pickle.dumps(("ipc", str(torch.cuda.get_device_properties(buf.device).uuid), args))
            keep = buf  # torch's IPC refcount keeps the block alive while a worker holds it
        else:
            path = os.path.join(_shm_dir(), f"rlhf-ws-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            mapped = _map_file(path, buf.numel(), buf.dtype)
            mapped.copy_(buf)
            self._files.append(path)
            handle = pickle.dumps(("shm", path, buf.numel(), str(buf.dtype).removeprefix("torch.")))
            keep = mapped
        self.store.set(f"b{i}/r{self.rank}", handle)
        self.wire_bytes += len(handle)
        acks = [f"ack{i}/w{k}" for k in self.receivers]
        try:
            self.store.wait(acks, timedelta(seconds=self.timeout_s))
        except Exception as e:  # the store's own timeout error
            raise TransportTimeout(f"weight sync ({self.backend}): engine worker(s) {self.receivers} did not map "
                                   f"bucket {i} within {self.timeout_s:g}s ({type(e).__name__})") from None
        del keep
        if self.backend == "shm":  # workers hold their own mapping: the name can go now
            os.unlink(self._files.pop())

    def close(self) -> None:
        if self._listen is not None:  # opened, never connected
            self._listen.close()
            self._listen = None
        for path in self._files:
            if os.path.exists(path):
                os.unlink(path)
        self._files = []
        super().close()


class Receiver(_Link):
    """An engine worker's side: sync rank `rank`; `source` is the actor rank whose buckets it maps
    (mapped backends)."""

    @classmethod
    def join(cls, backend: str, addr: str, port: int, rank: int, world: int, timeout_s: float,
             source: int = 0) -> Receiver:
        r = cls(backend, rank, world, timeout_s)
        r.source, r.received = source, 0
        r._connect(addr, port, None)
        return r

    def recv(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self.backend in BROADCAST:
            buf = torch.empty(numel, dtype=dtype, device=self.device)
            self._broadcast(buf)
        else:
            buf = self._map(numel, dtype)
        self.received += 1
        return buf

    def _map(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        i, key = self.received, f"b{self.received}/r{self.source}"
        try:
            self.store.wait([key], timedelta(seconds=self.timeout_s))
        except Exception as e:
            raise TransportTimeout(f"weight sync ({self.backend}): actor rank {self.source} did not publish bucket "
                                   f"{i} within {self.timeout_s:g}s ({type(e).__name__})") from None
        raw = self.store.get(key)
        self.wire_bytes += len(raw)
        handle = pickle.loads(raw)
        if handle[0] == "ipc":
            buf = _open_ipc(handle[1], handle[2], self.rank)
        else:
            _, path, n, dt = handle
            if n != numel or dt != str(dtype).removeprefix("torch."):
                raise RuntimeError(f"weight sync: bucket {i} is {n} x {dt} but the plan says {numel} x {dtype}")
            buf = _map_file(path, numel, dtype)
        self.store.set(f"ack{i}/w{self.rank}", b"1")
        return buf


def _shm_dir() -> str:
    """Memory-backed files where the OS has them (Linux /dev/shm), else the temp dir's page cache."""
    import tempfile

    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _map_file(path: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over a shared file mapping (created at the right size when missing): writes by one
    process are seen by every other that maps it, with no copy through a socket."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, (numel,), (1,))


def _open_ipc(gpu_uuid: str, args: tuple, rank: int) -> torch.Tensor:
    """Rebuild a CUDA tensor from another process's IPC handle, on this process's device, which must be
    the same physical GPU (colocation puts engine worker k on actor rank k's device)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dev = torch.cuda.current_device()
    mine = str(torch.cuda.get_device_properties(dev).uuid)
    if mine != gpu_uuid:
        raise RuntimeError(f"weight sync (ipc): engine worker {rank} is on GPU {mine} but its actor rank's bucket "
                           f"is on GPU {gpu_uuid}: colocated engines must share their actor rank's device")
    args = list(args)
    args[6] = dev  # rebuild_cuda_tensor's storage_device: this process's index of that GPU
    return rebuild_cuda_tensor(*args)
