"""Check `sft`: configs/sft/tiny-cpu.yaml (packing on) on the kit policy, 20 bf16 steps on one GPU (training.py)."""

from tests.gpu.checks.common import main
from tests.gpu.checks.training import train_check


def check(work):
    return train_check("sft", "configs/sft/tiny-cpu.yaml", work, ("sft_train.jsonl", "sft_test_seen.jsonl"))


if __name__ == "__main__":
    raise SystemExit(main("sft", check))
