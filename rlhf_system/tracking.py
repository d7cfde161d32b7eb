"""Metrics: a JSONL file in the run directory plus a console line per logged step.

Only rank 0 writes. wandb / tensorboard and the PNG plots come with the rest of issue 3.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Tracker:
    def __init__(self, run_dir: str | Path, enabled: bool = True, total_steps: int = 0, console: bool = True):
        self.enabled = enabled
        self.total = total_steps
        self.console = console
        self.start = time.perf_counter()
        self.path = Path(run_dir) / "metrics.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time_s": round(time.perf_counter() - self.start, 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.console:
            elapsed = time.perf_counter() - self.start
            eta = f" eta={elapsed / step * max(self.total - step, 0):.0f}s" if step else ""
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"[step {step}/{self.total}] {shown}{eta}", file=sys.stderr, flush=True)
