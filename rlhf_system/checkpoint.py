"""Run-level checkpoints: DeepSpeed engine states plus the run state, written atomically, resumable.

Layout (run_dir/checkpoints/):
    step_00000010/
        engine/...            DeepSpeed save_checkpoint: module, optimizer (ZeRO shards), LR scheduler
        rng_rank{r}.pt        python / numpy / torch RNG states of rank r (dropout, sampling)
        data_rank{r}.json     rank r's position in its share of a streamed dataset (data.streaming only)
        run_state.json        step, epoch, position in the epoch's batch order, seed, extra (per trainer)
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

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def begin(run_dir: str | Path, step: int) -> Path:
    tmp = checkpoint_root(run_dir) / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, run_state: dict, keep_last: int) -> Path:
    """Write run_state.json, atomically publish the checkpoint, rotate old ones."""
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
    """`none` -> None; `auto` -> latest complete checkpoint in run_dir (None if there is none);
    a path -> that checkpoint, which must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        done = complete_checkpoints(checkpoint_root(run_dir))
        return done[-1] if done else None
    path = Path(resume)
    if not (path / "run_state.json").exists():
        raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint (no run_state.json)")
    return path


def read_run_state(path: Path) -> dict:
    return json.loads((path / "run_state.json").read_text())


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
    load_path, _ = engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"{path}: no DeepSpeed engine state under engine/")
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
