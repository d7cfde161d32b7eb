"""`rlhf bench gemm` measures both dtypes on this CPU and reports what `model.dtype: auto` picks here."""

from rlhf_system.bench import gemm
from rlhf_system.cpu_features import cpu_bf16


def test_gemm_bench_reports_both_dtypes_and_the_auto_choice():
    out = gemm.run(steps=2, shape=(64, 64, 64))
    assert out["shape"] == [64, 64, 64]
    assert out["dtype_auto_cpu"] == ("bfloat16" if cpu_bf16() else "float32")
    per_threads = [v for k, v in out.items() if k.startswith("threads_")]
    assert per_threads and "threads_1" in out
    for v in per_threads:
        assert v["fp32_gflops"] > 0 and v["bf16_gflops"] > 0 and v["bf16_over_fp32"] > 0
