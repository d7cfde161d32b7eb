"""Check `dpo`: configs/dpo/tiny-cpu.yaml (the kit policy, its own reference), 20 bf16 steps on one GPU
(training.py)."""

from tests.gpu.checks.common import main
from tests.gpu.checks.training import train_check


def check(work):
    return train_check("dpo", "configs/dpo/tiny-cpu.yaml", work, ("pref_train.jsonl", "pref_test.jsonl"))


if __name__ == "__main__":
    raise SystemExit(main("dpo", check))
