"""Check `rm`: configs/rm/tiny-cpu.yaml (a value head on the kit policy, Bradley-Terry on the synthetic pairs),
20 bf16 steps on one GPU (training.py)."""

from tests.gpu.checks.common import main
from tests.gpu.checks.training import train_check


def check(work):
    return train_check("rm", "configs/rm/tiny-cpu.yaml", work, ("pref_train.jsonl", "pref_test.jsonl"))


if __name__ == "__main__":
    raise SystemExit(main("rm", check))
