"""The weight-sync wire (distributed/sync_transport.py), every backend that runs on CPU, with one sender
and several receivers as threads of this process: the bytes arrive exactly, mapped backends move only
handles through the socket, the NCCL code path (over the fake communicator) keeps its ranks apart, and a
peer that stops mid-sync becomes an error within the deadline instead of a hang."""

import os
import threading
import time

import pytest
import torch

from rlhf_system.distributed.sync_transport import Receiver, Sender, TransportTimeout

BUCKETS = [torch.randn(4096, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _run(backend: str, receivers: int = 2, senders: int = 1, timeout: float = 30.0, stop_after: int | None = None):
    """One sync over `backend`: returns (what each receiver got, each side's link, sender errors)."""
    world = senders + receivers
    first = Sender.listen(backend, "127.0.0.1", world, timeout)
    got: dict[int, list] = {}
    links: dict[str, object] = {}
    errors: dict[str, BaseException] = {}

    def send(r: int):
        try:
            s = first if r == 0 else Sender(backend, r, world, timeout)
            links[f"s{r}"] = s
            s.connect("127.0.0.1", first.port, r, [senders + j for j in range(receivers) if j % senders == r])
            for b in BUCKETS:
                s.send(b.clone())
            s.finish()
        except BaseException as e:
            errors[f"s{r}"] = e

    def recv(j: int):
        try:
            rx = Receiver.join(backend, "127.0.0.1", first.port, senders + j, world, timeout, source=j % senders)
            links[f"r{j}"] = rx
            got[j] = []
            for i, b in enumerate(BUCKETS):
                if stop_after is not None and i == stop_after:
                    raise RuntimeError("engine raised mid-sync")
                got[j].append(rx.recv(b.numel(), b.dtype).clone())
            rx.finish()
        except BaseException as e:
            errors[f"r{j}"] = e

    threads = [threading.Thread(target=send, args=(r,)) for r in range(senders)]
    threads += [threading.Thread(target=recv, args=(j,)) for j in range(receivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    assert not any(t.is_alive() for t in threads), "a side hung past its deadline"
    for link in links.values():
        link.close()
    return got, links, errors


@pytest.mark.parametrize("backend", ["gloo", "fake_nccl", "shm"])
def test_every_receiver_gets_the_exact_bytes(backend):
    got, links, errors = _run(backend, receivers=3)
    assert not errors, errors
    for j in range(3):
        assert all(torch.equal(a, b) for a, b in zip(got[j], BUCKETS)), f"receiver {j}"


def test_shared_memory_moves_only_handles_and_leaves_no_files(tmp_path):
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    got, links, errors = _run("shm", receivers=2, senders=2)
    assert not errors, errors
    moved = sum(b.numel() * b.element_size() for b in BUCKETS) * 2
    wire = sum(link.wire_bytes for link in links.values())
    assert 0 < wire < 500 * len(BUCKETS) * 4, wire  # handles: a path and a shape per bucket and side
    assert wire < moved / 100
    if before:
        leaked = [f for f in set(os.listdir("/dev/shm")) - before if f.startswith("rlhf-ws-")]
        assert not leaked, leaked


def test_fake_nccl_refuses_two_processes_on_one_rank():
    from vllm.distributed.utils import StatelessProcessGroup

    from rlhf_system.distributed import fake_nccl

    first = Sender.listen("fake_nccl", "127.0.0.1", 2, 10)
    store_side = {}

    def master():
        store_side["pg"] = StatelessProcessGroup.create("127.0.0.1", first.port, 0, 2, store_timeout=10,
                                                        listen_socket=first._listen)

    t = threading.Thread(target=master)
    t.start()
    other = StatelessProcessGroup.create("127.0.0.1", first.port, 1, 2, store_timeout=10)
    t.join(10)
    other.store.add("fake_nccl/rank1", 1)  # someone already joined as rank 1
    with pytest.raises(RuntimeError, match="two processes joined as rank 1"):
        fake_nccl.PyNcclCommunicator(other, device="cpu")


def test_fake_nccl_checks_calls_against_the_installed_signatures():
    from rlhf_system.distributed import fake_nccl

    with pytest.raises(TypeError):
        fake_nccl.PyNcclCommunicator(object(), "cpu", None, "extra")  # the real __init__ takes three


def test_a_receiver_that_raises_mid_sync_fails_the_sender_within_its_deadline():
    """The NCCL path's sender enqueues its broadcasts and returns; without the event poll under the
    deadline it would wait for the missing receiver for ever (on a GPU, in cuda.synchronize)."""
    t = time.monotonic()
    got, links, errors = _run("fake_nccl", receivers=2, timeout=4.0, stop_after=1)
    assert "engine raised mid-sync" in str(errors.get("r0", errors.get("r1")))
    assert isinstance(errors.get("s0"), TransportTimeout), errors
    assert "did not complete within 4s" in str(errors["s0"])
    assert time.monotonic() - t < 4.0 + 10, "the sender outlived its deadline"


def test_a_mapped_receiver_that_never_comes_fails_the_sender_within_its_deadline():
    t = time.monotonic()
    got, links, errors = _run("shm", receivers=1, timeout=3.0, stop_after=0)
    assert isinstance(errors.get("s0"), TransportTimeout) and "did not map bucket 0" in str(errors["s0"])
    assert time.monotonic() - t < 20
