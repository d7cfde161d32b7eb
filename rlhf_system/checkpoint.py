"""Run-level checkpoints: DeepSpeed engine states plus the run state, written atomically, resumable.

Layout (run_dir/checkpoints/):
    step_00000010/
        engine/...            DeepSpeed save_checkpoint: module, optimizer (ZeRO shards), LR scheduler
        rng_rank{r}.pt        python / numpy / torch RNG states of rank r (dropout, sampling)
        data_rank{r}.json     rank r's position in its share of a streamed dataset (data.streaming only)
        manifest.json         every file's size, checked before a resume (a truncated file is named)
        run_state.json        step, epoch, position in the epoch's batch order, seed, extra (per trainer),
                              the resolved config and model.path's shape (a resume must match them)
    step_00000010.tmp/        a save in progress: never picked by resume

Contract, in order (the controller drives it; every rank takes part):
1. `begin(run_dir, step)` makes `step_N.tmp/` (removing a stale one from a crash).
2. Every worker writes its engine shard and RNG state into it (`BaseWorker.save_checkpoint`).
3. The controller writes run_state.json last, then renames `.tmp` to the final name: the rename is
   atomic, so a kill at any point leaves either a complete checkpoint or an ignored `.tmp`.
4. Older complete checkpoints beyond `checkpoint.keep_last` are deleted.
Map-style data order needs no saving: batches come from `seed + epoch` (data/batching.py), so
(epoch, position) replays it exactly; a stream's position is saved per rank (data/stream.py). Checkpoints must be on storage every rank can reach.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import torch

from rlhf_system.errors import RunFailure, UserError

STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
logger = logging.getLogger(__name__)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


class CheckpointError(UserError):
    """A checkpoint to resume from is missing, incomplete, damaged, or from another model / config."""


def begin(run_dir: str | Path, step: int) -> Path:
    tmp = checkpoint_root(run_dir) / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def saving(run_dir: str | Path, step: int):
    """begin() .. (the body writes the shards) .. and, when a write fails, remove the partial save and
    raise one RunFailure naming the folder and its free space. The previous checkpoint is untouched
    (nothing is rotated before a commit), so resume still has it."""
    tmp = begin(run_dir, step)
    try:
        yield tmp
    except Exception as e:
        free = shutil.disk_usage(tmp.parent).free
        cause = _disk_cause(e, free)
        if cause is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        done = complete_checkpoints(tmp.parent)
        kept = f"; {done[-1].name} is intact (resume uses it)" if done else ""
        raise RunFailure(f"checkpoint {tmp}: write failed ({cause}); {free / 2**20:.0f} MiB free on "
                         f"{tmp.parent}{kept}. Fix: free space or move run_dir") from e


LOW_SPACE = 64 * 2**20  # bytes free at a failed save below which the disk is taken to be the cause


def _disk_cause(e: BaseException, free: int) -> str | None:
    """Why a save failed, when the disk is the reason: an ENOSPC / EDQUOT error, or any error with the
    disk (nearly) full. torch.save on a full disk raises "unexpected pos 576 vs 534", naming no disk."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return x.strerror or str(x)
        if "No space left" in str(x):
            return "No space left on device"
    return "the disk is full" if free < LOW_SPACE else None


def _chain(e: BaseException | None):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def commit(tmp: Path, run_state: dict, keep_last: int) -> Path:
    """Write manifest.json (every file's size, so a truncated file is found before resuming) and
    run_state.json, atomically publish the checkpoint, rotate old ones."""
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps(files, indent=1))
    state_file = tmp / "run_state.json"
    state_file.write_text(json.dumps(run_state, indent=2))
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(tmp.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints, oldest first (a `.tmp` folder or one without run_state.json is ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "run_state.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """`none` -> None; `auto` -> the latest complete, undamaged checkpoint in run_dir (None if there is
    none; a damaged later one is skipped with a warning); a path -> that checkpoint, which must exist,
    be complete and be undamaged (else a CheckpointError saying which)."""
    if resume == "none":
        return None
    if resume == "auto":
        for path in reversed(complete_checkpoints(checkpoint_root(run_dir))):
            problem = damage(path)
            if problem is None:
                return path
            logger.warning("checkpoint %s is damaged (%s); trying the one before", path, problem)
        return None
    path = Path(resume)
    where = f"checkpoint.resume={resume}"
    if not path.exists():
        near = complete_checkpoints(checkpoint_root(path)) or complete_checkpoints(checkpoint_root(run_dir))
        fix = f"checkpoint.resume={near[-1]}" if near else "checkpoint.resume=auto (latest in run_dir) or none"
        raise CheckpointError(f"{where}: no such folder. Fix: {fix}")
    if (path / "checkpoints").is_dir():
        raise CheckpointError(f"{where} is a run folder, not a checkpoint. Fix: checkpoint.resume=auto with "
                              f"run_dir={path}, or one of {path}/checkpoints/step_*")
    if not path.is_dir():
        raise CheckpointError(f"{where} is a file, not a checkpoint folder. Fix: one of "
                              f"{checkpoint_root(run_dir)}/step_*, or checkpoint.resume=auto")
    if not (path / "run_state.json").exists():
        if not (path / MANIFEST).exists() and not STEP_DIR.match(path.name.removesuffix(".tmp")):
            found = sorted(p.name for p in path.iterdir())
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "") or "nothing"
            raise CheckpointError(f"{where} is not a checkpoint of this project (no run_state.json or {MANIFEST}; it "
                                  f"holds {shown}). Fix: one of {checkpoint_root(run_dir)}/step_*, or "
                                  "checkpoint.resume=auto")
        raise CheckpointError(f"{where}: not a complete checkpoint (no run_state.json: its save never finished). "
                              "Fix: resume from an earlier step_* folder, or checkpoint.resume=auto")
    problem = damage(path)
    if problem is not None:
        raise CheckpointError(f"{where}: damaged: {problem}. Fix: resume from an earlier step_* folder")
    return path


def damage(path: Path) -> str | None:
    """What is wrong with a published checkpoint's files, or None. run_state.json must parse and hold the
    step. With a manifest (every save since it was added, so one that records its config must have it):
    each file is there at its recorded size. Without one: each .pt file has the end record of a torch zip
    archive (a truncated or overwritten file has not)."""
    state = path / "run_state.json"
    try:
        run_state = json.loads(state.read_text())
    except (OSError, ValueError):
        return f"{state} is not valid JSON (truncated or overwritten)"
    if not isinstance(run_state, dict) or not isinstance(run_state.get("step"), int):
        return f"{state} has no step number"
    manifest = path / MANIFEST
    if not manifest.exists() and "config" in run_state:  # saved by a version that always writes one
        return f"{manifest} is missing, so the files cannot be checked"
    if manifest.exists():
        try:
            files = json.loads(manifest.read_text())
        except ValueError:
            return f"{manifest} is not valid JSON"
        for rel, size in files.items():
            f = path / rel
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != size:
                return f"{f} is {f.stat().st_size} bytes, {size} were written (truncated or replaced)"
    for f in sorted(path.rglob("*.pt")):
        if not zipfile.is_zipfile(f):
            return f"{f} is not a torch checkpoint file (truncated or overwritten)"
    return None


def read_run_state(path: Path) -> dict:
    return json.loads((path / "run_state.json").read_text())


# ------------------------------------------------------------------------- is it the same run?
# Settings a resumed run may change: where it logs, how often it saves, how long it runs, deadlines,
# what it evaluates on. Everything else (model, data, optimiser, algorithm, batch sizes, seed) must be
# what the checkpoint was trained with, or the resumed run is a different run under the same name.
MAY_CHANGE = ("name", "run_dir", "logging", "checkpoint", "train.max_steps", "train.epochs", "train.eval_every",
              "train.max_eval_samples", "data.eval", "data.num_proc", "data.cache_dir", "placement.timeout_s",
              "placement.call_timeout_s", "placement.threads_per_worker", "rollout.sync_bucket_mb")
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size")


def identity(cfg) -> dict:
    """What run_state records so a resume can tell it is the same run: the config, and the shape of
    model.path (read from its config.json)."""
    return {"config": cfg.model_dump(mode="json"), "model_shape": model_shape(cfg.model.path)}


def model_shape(path: str) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        return {}
    config = json.loads(f.read_text())
    config = config.get("text_config", config) if "hidden_size" not in config else config
    return {k: config[k] for k in SHAPE_KEYS if k in config}


def check_same_run(path: Path, cfg) -> None:
    """The checkpoint at `path` was made by this run: same model shape, same config outside
    MAY_CHANGE (checkpoint.allow_config_change=true accepts differences). Older checkpoints without
    the record are accepted."""
    state = read_run_state(path)
    saved_shape, shape = state.get("model_shape"), model_shape(cfg.model.path)
    if saved_shape and shape and saved_shape != shape:
        diff = ", ".join(f"{k} {saved_shape.get(k)} -> {shape.get(k)}" for k in SHAPE_KEYS
                         if saved_shape.get(k) != shape.get(k))
        raise CheckpointError(f"checkpoint {path} was trained on a model of another shape than model.path "
                              f"'{cfg.model.path}' ({diff}). Fix: point model.path at the model the run started from")
    saved = state.get("config")
    if saved is None or cfg.checkpoint.allow_config_change:
        return
    changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in _differences(saved, cfg.model_dump(mode="json"))]
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise CheckpointError(f"checkpoint {path} was trained with another config: {shown}. Fix: resume with "
                              "the run's config (its config.yaml), or set checkpoint.allow_config_change=true")


def _differences(a: dict, b: dict, prefix: str = ""):
    for key in sorted(set(a) | set(b)):
        dotted = f"{prefix}{key}"
        if any(dotted == m or dotted.startswith(m + ".") for m in MAY_CHANGE):
            continue
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _differences(x, y, dotted + ".")
        elif x != y:
            yield dotted, x, y


def check_resume(cfg) -> Path | None:
    """The checkpoint this run resumes from, fully checked before any worker starts (or None)."""
    path = resolve_resume(cfg.checkpoint.resume, cfg.run_dir)
    if path is not None:
        check_same_run(path, cfg)
    return path


# ------------------------------------------------------------------------------------ per rank
def rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank(engine, path: str | Path, rank: int) -> None:
    """Collective: every rank saves its engine shard; then its own RNG state."""
    path = Path(path)
    engine.save_checkpoint(str(path), tag="engine")
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")


def save_data_position(path: str | Path, rank: int, state: dict | None) -> None:
    if state is not None:
        (Path(path) / f"data_rank{rank}.json").write_text(json.dumps(state))


def load_data_position(path: str | Path, rank: int) -> dict | None:
    f = Path(path) / f"data_rank{rank}.json"
    return json.loads(f.read_text()) if f.exists() else None


def load_rank(engine, path: str | Path, rank: int) -> None:
    path = Path(path)
    try:
        load_path, _ = engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as e:  # DeepSpeed's own errors name no file (a bare AssertionError, a size mismatch)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path}: rank {rank} could not load its engine state: {type(e).__name__}: "
                              f"{first}. Fix: resume from another checkpoint, with the run's model and config") from e
    if load_path is None:
        raise CheckpointError(f"{path}: no DeepSpeed engine state under engine/ (rank {rank})")
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
