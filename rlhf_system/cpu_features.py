"""Whether this CPU computes bf16 matrix products in hardware, which decides `model.dtype: auto` on CPU.

x86 with AMX (amx_bf16) or AVX-512 BF16 runs bf16 GEMMs through oneDNN several times faster than fp32
(AMX: ~7x on one core); without them PyTorch emulates bf16 by converting to fp32 and back, slower than
fp32 itself (on this project's 2-core AVX2 EPYC: `python -m rlhf_system.bench.gemm` measures both).
ARM's bf16 extension counts the same way. The answer comes from torch's own cpuinfo probe.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

BF16_FEATURES = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")


@functools.cache
def cpu_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (logged once per process)."""
    import torch

    caps = torch.cpu.get_capabilities()
    found = [f for f in BF16_FEATURES if caps.get(f) is True]
    log.info("CPU %s: %s", caps.get("cpu_name", "?"),
             f"bf16 in hardware ({', '.join(found)}): model.dtype auto -> bfloat16" if found
             else "no bf16 matrix instructions (no AMX / AVX-512 BF16): model.dtype auto -> float32")
    return bool(found)
