"""The processor's matrix-product bound, fp32 vs bf16: what a train phase could reach at best.

    rlhf bench gemm [--steps N]     one JSON object on stdout

The shape is the bench model's MLP on a 4096-token micro-batch (4096 x 512 @ 512 x 1536, shared/
bench-peers). On CPUs with AMX or AVX-512 BF16, oneDNN runs bf16 several times faster than fp32; without
them torch converts bf16 to fp32 and back, slower than fp32 itself. `model.dtype: auto` follows the same
flags (cpu_features.py); this measures what the flags promise on the machine at hand.
"""

from __future__ import annotations

import time

SHAPE = (4096, 512, 1536)


def gflops(dtype, threads: int, steps: int, shape: tuple[int, int, int] = SHAPE) -> float:
    import torch

    torch.set_num_threads(threads)
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    for _ in range(2):  # warm-up: oneDNN picks and caches its kernel
        a @ b
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / sorted(times)[len(times) // 2] / 1e9  # median


def run(steps: int = 10, shape: tuple[int, int, int] = SHAPE) -> dict:
    import torch

    from rlhf_system.cpu_features import BF16_FEATURES, cpu_bf16
    from rlhf_system.distributed.threads import node_cores

    caps = torch.cpu.get_capabilities()
    out = {"benchmark": "gemm", "shape": list(shape), "cpu": caps.get("cpu_name"),
           "bf16_features": [f for f in BF16_FEATURES if caps.get(f) is True], "dtype_auto_cpu":
           "bfloat16" if cpu_bf16() else "float32", "isa": torch.backends.cpu.get_cpu_capability()}
    before = torch.get_num_threads()
    for threads in sorted({1, len(node_cores())}):
        fp32 = gflops(torch.float32, threads, steps, shape)
        bf16 = gflops(torch.bfloat16, threads, steps, shape)
        # three significant figures: emulated bf16 on a small shape can be well under 0.1 GFLOP/s
        out[f"threads_{threads}"] = {"fp32_gflops": float(f"{fp32:.3g}"), "bf16_gflops": float(f"{bf16:.3g}"),
                                     "bf16_over_fp32": float(f"{bf16 / fp32:.3g}")}
    torch.set_num_threads(before)
    return out
