"""The controller's step loop shared by the SFT, reward-model and DPO trainers.

    result = fit(cfg, group, n_train, steps, tracker, step_verb="sft_step", eval_verb="sft_evaluate")

It walks epochs and global batches (trainers/batching.py), calls the group's step verb on every
rank, evaluates and logs, writes checkpoints every `checkpoint.save_every` steps (checkpoint.py), and
resumes from one: the engines are restored by the workers, and the loop skips to the saved
(epoch, position), so an interrupted run continues on exactly the batches it would have seen.
"""

from __future__ import annotations

import time

from rlhf_system import checkpoint
from rlhf_system.config import RunConfig
from rlhf_system.tracking import Tracker
from rlhf_system.trainers.batching import global_batches


def save(cfg: RunConfig, group, step: int, epoch: int, position: int, initial: dict) -> None:
    tmp = checkpoint.begin(cfg.run_dir, step)
    group.call("save_checkpoint", str(tmp))
    checkpoint.commit(tmp, {"step": step, "epoch": epoch, "position": position, "seed": cfg.seed,
                            "initial": initial}, cfg.checkpoint.keep_last)


def fit(cfg: RunConfig, group, n_train: int, steps: int, tracker: Tracker, step_verb: str, eval_verb: str) -> dict:
    t0 = time.perf_counter()
    resume = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.run_dir)
    if resume is not None:
        group.call("load_checkpoint", str(resume))
        state = checkpoint.read_run_state(resume)
        step, start_epoch, start_pos, initial = state["step"], state["epoch"], state["position"], state["initial"]
        tracker.log(step, {"resumed_from": str(resume)})
    else:
        step, start_epoch, start_pos = 0, 0, 0
        initial = group.call(eval_verb)[0]
        tracker.log(0, initial)
    every = cfg.checkpoint.save_every
    for epoch in range(start_epoch, cfg.train.epochs):
        batches = global_batches(n_train, cfg.train.global_batch_size, cfg.seed, epoch)
        for position in range(start_pos if epoch == start_epoch else 0, len(batches)):
            if step >= steps:
                break
            t = time.perf_counter()
            metrics = group.call(step_verb, batches[position], step)[0]
            step += 1
            metrics["step_s"] = time.perf_counter() - t
            if "tokens" in metrics:
                metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_s"]
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics.update(group.call(eval_verb)[0])
            if step % cfg.logging.log_every == 0 or step == steps:
                tracker.log(step, metrics)
            if every and (step % every == 0 or step == steps):
                save(cfg, group, step, epoch, position + 1, initial)
    final = group.call(eval_verb)[0]
    tracker.log(step, final)
    tracker.close()  # wandb / tensorboard flushed, plots written
    return {"steps": step, "seconds": time.perf_counter() - t0, "initial": initial, "final": final}
