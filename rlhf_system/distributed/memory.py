"""Peak memory of this process during a block of work: how weight sync shows that it is bounded.

    with PeakMemory(device) as peak:
        ...                                   # e.g. receive and load every bucket
    peak.rise                                 # bytes above what the process held when the block began

GPU: the CUDA caching allocator's peak, reset at the start. CPU: the kernel's resident-set high-water
mark (VmHWM), reset at the start by writing 5 to /proc/self/clear_refs (Linux). Measuring the rise
leaves out what the process already held (an engine's own weights and KV cache): what is left is the
extra memory the block needed. Where the counter cannot be reset (not Linux, a locked-down /proc),
`rise` is None: unmeasured, never a guess.
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


class PeakMemory:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.start: int | None = None
        self.peak: int | None = None
        self.rise: int | None = None

    def __enter__(self) -> PeakMemory:
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
