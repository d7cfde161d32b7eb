"""Peak memory of this process during a block of work: how weight sync shows that it is bounded.

    with PeakMemory(device) as peak:
        ...                                   # e.g. receive and load every bucket
    peak.rise                                 # bytes above what the process held when the block began

GPU: the CUDA caching allocator's peak, reset at the start. CPU: the kernel's resident-set high-water
mark (VmHWM), reset at the start by writing 5 to /proc/self/clear_refs (Linux). Measuring the rise
leaves out what the process already held (an engine's own weights and KV cache): what is left is the
extra memory the block needed. Where the counter cannot be reset (not Linux, a locked-down /proc),
`rise` is None: unmeasured, never a guess.

    process_peak_bytes(device)                # this process's peak so far (workers' peak_memory_mb)

Both read the same counters, and a block's reset would otherwise erase the process's earlier peak:
`PeakMemory` remembers the counter before resetting it, and `process_peak_bytes` reports the larger.
"""

from __future__ import annotations

import torch


def _status_bytes(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_BEFORE_RESET = {"cuda": 0, "cpu": 0}  # the highest peak a PeakMemory reset erased, per kind


def process_peak_bytes(device: torch.device | str = "cpu") -> int:
    """This process's peak memory so far: the CUDA allocator's peak on a GPU, else the resident set's
    high-water mark; peaks from before a PeakMemory block reset the counter included."""
    if torch.device(device).type == "cuda":
        return max(torch.cuda.max_memory_allocated(), _BEFORE_RESET["cuda"])
    hwm = _status_bytes("VmHWM")
    if hwm is None:  # not Linux: the rusage maximum (KiB on Linux, bytes on macOS: only reached off Linux)
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(hwm, _BEFORE_RESET["cpu"])


class PeakMemory:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.start: int | None = None
        self.peak: int | None = None
        self.rise: int | None = None

    def __enter__(self) -> PeakMemory:
        kind = "cuda" if self.cuda else "cpu"
        _BEFORE_RESET[kind] = process_peak_bytes(kind)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        elif _reset_hwm():
            self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self.start is not None:
            self.peak = _status_bytes("VmHWM")
        if self.start is not None and self.peak is not None:
            self.rise = max(0, self.peak - self.start)
