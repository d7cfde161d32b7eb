"""The controller's step loop shared by the SFT, reward-model and DPO trainers.

    result = fit(cfg, group, n_train, steps, tracker, resume) # group: SFTWorker, RewardModelWorker or DPOWorker ranks

It walks epochs and global batches (data/batching.py), calls the group's `train_step` on every
rank, evaluates and logs, writes checkpoints every `checkpoint.save_every` steps (checkpoint.py), and
resumes from one: the engines are restored by the workers, and the loop skips to the saved
(epoch, position), so an interrupted run continues on exactly the batches it would have seen.
SIGTERM / SIGUSR1 (preemption.py) end the run after the step in progress, with a checkpoint.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from rlhf_system import checkpoint
from rlhf_system.config import RunConfig
from rlhf_system.data.batching import global_batches
from rlhf_system.errors import cleanup
from rlhf_system.preemption import StopOnSignal
from rlhf_system.tracking import Tracker


def save(cfg: RunConfig, group, step: int, epoch: int, position: int, initial: dict) -> None:
    with checkpoint.saving(cfg.run_dir, step) as tmp:
        group.call("save_checkpoint", str(tmp))
        checkpoint.commit(tmp, {"step": step, "epoch": epoch, "position": position, "seed": cfg.seed,
                                "initial": initial, **checkpoint.identity(cfg)}, cfg.checkpoint.keep_last)


def batch_plan(cfg: RunConfig, n_train: int | None, start_epoch: int, start_pos: int):
    """(epoch, position, global batch) from the resume point on: dataset indices for map-style data;
    None for a stream (n_train None), where every rank takes its share from its own stream and the
    positions only count steps."""
    if n_train is None:
        yield from ((0, position, None) for position in itertools.count(start_pos))
        return
    for epoch in range(start_epoch, cfg.train.epochs):
        batches = global_batches(n_train, cfg.train.global_batch_size, cfg.seed, epoch)
        for position in range(start_pos if epoch == start_epoch else 0, len(batches)):
            yield epoch, position, batches[position]


def fit(cfg: RunConfig, group, n_train: int | None, steps: int, tracker: Tracker, resume: Path | None) -> dict:
    t0 = time.perf_counter()
    if resume is not None:
        group.call("load_checkpoint", str(resume))
        state = checkpoint.read_run_state(resume)
        step, start_epoch, start_pos, initial = state["step"], state["epoch"], state["position"], state["initial"]
        tracker.log(step, {"resumed_from": str(resume)})
    else:
        step, start_epoch, start_pos = 0, 0, 0
        initial = group.call("evaluate")[0]
        tracker.log(0, initial)
    every = cfg.checkpoint.save_every
    with StopOnSignal() as stop:
        for epoch, position, batch in batch_plan(cfg, n_train, start_epoch, start_pos):
            if step >= steps:
                break
            t = time.perf_counter()
            metrics = group.call("train_step", batch, step)[0]
            step += 1
            metrics["step_s"] = time.perf_counter() - t
            if "tokens" in metrics:
                metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_s"]
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics.update(group.call("evaluate")[0])
            if step % cfg.logging.log_every == 0 or step == steps or stop.requested:
                tracker.log(step, metrics)
            if (every and (step % every == 0 or step == steps)) or stop.requested:
                save(cfg, group, step, epoch, position + 1, initial)
            if stop.requested:  # preempted: the checkpoint above is where resume=auto goes on
                tracker.log(step, {"stopped_by": stop.signal})
                tracker.close()
                return {"steps": step, "seconds": time.perf_counter() - t0, "initial": initial,
                        "stopped_by": stop.signal}
    final = group.call("evaluate")[0]
    tracker.log(step, final)
    tracker.close()  # wandb / tensorboard flushed, plots written
    return {"steps": step, "seconds": time.perf_counter() - t0, "initial": initial, "final": final}


def train_with_group(cfg: RunConfig, steps: int, role: str, worker_cls: type, num_workers: int) -> dict:
    """The controller's hand-over, the same for every trainer: write the resolved config, start the
    role's group of `worker_cls` ranks, set every rank up (`setup`), `fit` with `train_step` /
    `evaluate`, export to run_dir/hf, and always shut the group down."""
    from rlhf_system.placement.group import make_group

    resume = checkpoint.check_resume(cfg)  # a bad checkpoint fails here, before any worker starts
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    cfg.dump(Path(cfg.run_dir) / "config.yaml")
    tracker = Tracker(cfg.run_dir, cfg.logging, steps, config=cfg.model_dump(mode="json"), name=cfg.name)
    group = make_group(role, worker_cls, num_workers, cfg.placement)
    failed = True
    try:
        n_train = group.call("setup", cfg)[0]["train_samples"]
        result = fit(cfg, group, n_train, steps, tracker, resume)
        out = Path(cfg.run_dir) / "hf"
        export = cfg.checkpoint.export_hf and "stopped_by" not in result  # preempted: no time to export
        if export:
            group.call("save_hf", str(out))
        failed = False
        return {**result, "export": str(out) if export else None}
    finally:
        cleanup(failed, group.shutdown)
