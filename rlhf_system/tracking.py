"""Metrics: console progress, metrics.jsonl in the run directory, wandb, tensorboard and PNG plots.

    tracker = Tracker(cfg.run_dir, cfg.logging, total_steps=n, config=cfg.model_dump(mode="json"))
    tracker.log(step, {"loss": 1.2, "lr": 1e-4, "tokens_per_s": 900.0})
    tracker.close()          # flushes wandb / tensorboard and writes plots/*.png

Only the controller tracks (workers return metrics to it). wandb never prompts: without an API key
it runs offline (WANDB_MODE=offline) and writes under run_dir/wandb, to `wandb sync` later.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from rlhf_system.config import LoggingConfig

# Which logged keys share a plot; a key not listed gets its own.
PLOT_GROUPS = {
    "loss": ("loss", "eval_loss"),
    "accuracy": ("accuracy", "eval_accuracy", "reward_accuracy", "eval_reward_accuracy"),
    "reward": ("reward", "eval_reward", "reward_margin", "eval_margin", "eval_logp_margin",
               "reward/total", "reward/rules", "reward/model", "reward/remote"),
    "held_out_reward": ("eval/rl_test_seen/all/reward", "eval/rl_test_seen/sampled/all/reward",
                        "eval/rl_test_unseen_phrasing/all/reward", "eval/rl_test_seen/rm_score"),
    "kl": ("kl",),
    "ppo_loss": ("actor/pg_loss", "actor/kl_loss", "critic/loss"),
    "lr": ("lr",),
    "throughput": ("tokens_per_s",),
}

TIME_PHASES = ("time/generate", "time/reward", "time/inference", "time/train", "time/sync")


class Tracker:
    def __init__(self, run_dir: str | Path, logging: LoggingConfig | None = None, total_steps: int = 0,
                 config: dict | None = None, name: str = "run", console: bool | None = None):
        self.cfg = logging or LoggingConfig()
        self.console = self.cfg.console if console is None else console
        self.total = total_steps
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.start = time.perf_counter()
        self._wandb = self._tb = None
        if self.cfg.wandb:
            import wandb

            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"  # no key: never prompt, log locally
            self._wandb = wandb.init(project=self.cfg.wandb_project, name=name, dir=str(self.run_dir),
                                     config=config or {}, reinit="finish_previous")
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time_s": round(time.perf_counter() - self.start, 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        self._print(step, metrics)  # the caller decides which steps to log (logging.log_every)

    def _print(self, step: int, metrics: dict) -> None:
        if not self.console:
            return
        elapsed = time.perf_counter() - self.start
        filled = int(20 * step / self.total) if self.total else 0
        bar = f"[{'#' * filled}{'.' * (20 - filled)}] {step}/{self.total}"
        eta = f" eta {elapsed / step * max(self.total - step, 0):.0f}s" if step else ""
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"{bar} {shown}{eta}", file=sys.stderr, flush=True)

    def close(self) -> list[Path]:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
        # A run that failed before its first log line has nothing to plot; closing it must not raise and
        # hide the error that stopped the run.
        return plot_metrics(self.path, self.run_dir / "plots") if self.cfg.plots and self.path.exists() else []


def plot_metrics(metrics_file: Path, out_dir: Path) -> list[Path]:
    """One PNG per metric group (PLOT_GROUPS) from metrics.jsonl, plus the PPO time split (time_split.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k not in ("step", "time_s") and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and math.isfinite(v):
                series.setdefault(k, []).append((row["step"], v))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, keys in PLOT_GROUPS.items():
        present = [k for k in keys if k in series]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in present:
            steps, values = zip(*series[k])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=k)
        ax.set_xlabel("step")
        ax.set_title(group)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    phases = [k for k in TIME_PHASES if k in series]
    if phases:  # PPO: where each step's time goes, stacked
        steps = [st for st, _ in series[phases[0]]]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.stackplot(steps, *[[dict(series[k]).get(st, 0.0) for st in steps] for k in phases],
                     labels=[k.split("/")[1] for k in phases])
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.set_title("time per PPO step, by phase")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        path = out_dir / "time_split.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
