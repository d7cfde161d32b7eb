"""What every GPU check shares: its result line, dependency probes, the tiny assets, `rlhf` in-process.

A check module is run as `python -m tests.gpu.checks.NAME WORK OUT` by run_checks.sh, with its stdout sent
to stderr (vLLM, DeepSpeed and Ray print there too). `main(NAME, fn)` calls `fn(WORK)` and writes ONE
JSON line to the file OUT: {"check": NAME, "ok": true|false|null, "skipped"?: reason, ...figures}. `fn`
raises `Skip(reason)` for a dependency or device this machine lacks; any other exception is a failed
check (ok false, the error in one line, the traceback on stderr).

Only the standard library is imported at module level: a check that skips for a missing package must
not fail importing it first.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# RLHF_GPU_CHECKS_ON_CPU=1: run the checks' plumbing on CPU (float32, gpus_per_node=0), to develop them on a
# machine without a GPU. Their figures then mean nothing; run_checks.sh never sets it by itself.
ON_CPU = os.environ.get("RLHF_GPU_CHECKS_ON_CPU") == "1"
STEPS = int(os.environ.get("RLHF_GPU_CHECK_STEPS", "20"))  # training steps of the sft / rm / dpo checks


class Skip(Exception):
    """The check cannot run here; the message is the reason."""


def missing(*modules: str) -> list[str]:
    """Why each of `modules` cannot be used here: not installed, or installed but failing to import (a CUDA
    or ABI mismatch)."""
    reasons = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module blocked in sys.modules (None): as good as absent
            found = False
        if not found:
            reasons.append(f"{name} not installed")
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # any import failure makes the package unusable here
            reasons.append(f"{name} does not import: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
    return reasons


def gpu_shortage(gpus: int = 1, why: str = "") -> list[str]:
    if ON_CPU:
        return []
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have >= gpus:
        return []
    return [f"needs {gpus} GPUs{f' ({why})' if why else ''}, this machine has {have}"]


def need(*modules: str, gpus: int = 1, why_gpus: str = "") -> None:
    """Skip, giving every reason at once, unless this machine has `gpus` CUDA devices and every module imports."""
    reasons = gpu_shortage(gpus, why_gpus) + missing(*modules)
    if reasons:
        raise Skip("; ".join(reasons))


def on_gpu() -> bool:
    return not ON_CPU


def gpu_overrides() -> list[str]:
    """The placement and dtype of a check's run: one GPU in bf16 (CPU mode: none, float32)."""
    if ON_CPU:
        return ["placement.gpus_per_node=0", "model.dtype=float32"]
    return ["placement.gpus_per_node=1", "model.dtype=bfloat16"]


class DeviceMemory:
    """The largest memory in use on the GPUs while the block runs (nvidia-smi every 0.5 s, every process
    together: Ray workers and vLLM engines hold memory this process's torch does not see). MiB, None in
    CPU mode or without nvidia-smi."""

    def __enter__(self):
        import subprocess
        import threading

        self.peak_mib: int | None = None
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.5):
                try:
                    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True, timeout=10).stdout
                    used = max(int(x) for x in out.split())
                except (OSError, ValueError, subprocess.SubprocessError):
                    continue
                self.peak_mib = max(self.peak_mib or 0, used)

        self._thread = threading.Thread(target=poll, daemon=True)
        if not ON_CPU:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        return False


def reset_peak() -> None:
    if not ON_CPU:
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """torch.cuda.max_memory_allocated of this process, GiB (None in CPU mode)."""
    if ON_CPU:
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


ASSETS_SKIPPED = "assets.skipped"  # in WORK: why the assets step could not run (a package missing)


def assets(work: Path) -> dict[str, Path]:
    """The tiny model and data that `python -m tests.gpu.checks.assets WORK` built."""
    if (work / ASSETS_SKIPPED).exists():
        raise Skip((work / ASSETS_SKIPPED).read_text().strip())
    paths = {"policy": work / "tiny" / "policy", "reward": work / "tiny" / "reward", "data": work / "data"}
    if not (paths["policy"] / "config.json").exists() or not (paths["data"] / "manifest.json").exists():
        raise RuntimeError(f"the tiny model and data are missing under {work}: the assets step failed (its "
                           "stderr says why)")
    return paths


def finite_and_down(losses: list[float], k: int = 3) -> bool:
    """Every loss finite and the mean of the last k below the mean of the first k."""
    if len(losses) < 2 or not all(math.isfinite(x) for x in losses):
        return False
    k = max(1, min(k, len(losses) // 2))
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def metric_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def missing_import(text: str) -> tuple[str, str] | None:
    """(package, 'file:line' of the import) when a traceback ends in `No module named X` for a package
    outside this repository (a missing dependency, not a bug of ours); None otherwise."""
    m = re.search(r"ModuleNotFoundError: (?:No module named '([\w.]+)'|import of ([\w.]+) halted)", text)
    if not m:
        return None
    package = (m.group(1) or m.group(2)).split(".")[0]
    if package in ("rlhf_system", "tests"):
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text[:m.start()])
    where = ""
    for path, line, func in reversed(frames):  # the innermost frame of ours: where the import is
        p = Path(path)
        if p.is_relative_to(REPO):
            where = f"{p.relative_to(REPO)}:{line} ({func})"
            break
    return package, where


class _Tee:
    """sys.stderr that also keeps what was written (the CLI's one-line error)."""

    def __init__(self, stream):
        self.stream, self.text = stream, []

    def write(self, s: str) -> int:
        self.text.append(s)
        return self.stream.write(s)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def rlhf(args: list[str], run_dir: Path, what: str) -> None:
    """`rlhf ARGS` in this process, through the CLI's own entry point (rlhf_system.cli.main). A failure for
    a package that is not installed is a Skip naming where the run imports it (`what`: which code path);
    any other failure raises with the CLI's error line."""
    from rlhf_system import cli

    tee = sys.stderr = _Tee(sys.stderr)
    try:
        rc = cli.main(args)
    finally:
        sys.stderr = tee.stream
    if rc == 0:
        return
    said = [line for line in "".join(tee.text).splitlines() if line.startswith("error: ")]
    line = said[-1] if said else f"exit status {rc}"
    # the traceback: the run folder's error.log, or the log the error line names (a failure before the run
    # folder existed)
    m = re.search(r"\(traceback: (\S+)\)", line)
    log = Path(run_dir) / "error.log"
    log = log if log.exists() else Path(m.group(1)) if m else None
    text = log.read_text() if log is not None and log.exists() else line
    found = missing_import(text)
    if found:
        package, where = found
        raise Skip(f"{package} not installed, and {what} imports it" + (f" at {where}" if where else ""))
    raise RuntimeError(f"rlhf {' '.join(args[:2])}: {line}")


def skip_missing_packages(fn, work: Path) -> dict:
    """fn(work), with a package the project needs and this image lacks made a Skip (a module of ours that
    is missing stays an error)."""
    try:
        return fn(work)
    except ModuleNotFoundError as e:
        package = (e.name or "").split(".")[0]
        if not package or package in ("rlhf_system", "tests"):
            raise
        traceback.print_exc()
        raise Skip(f"{package} not installed") from None


def main(name: str, fn) -> int:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    t0 = time.perf_counter()
    try:
        result = skip_missing_packages(fn, work)
    except Skip as s:
        result = {"ok": None, "skipped": str(s)}
    except BaseException as e:  # every failure becomes the check's result line
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        result = {"ok": False, "error": f"{type(e).__name__}: {first}"[:1000]}
    line = {"check": name, **result, "seconds": round(time.perf_counter() - t0, 1)}
    if ON_CPU and "skipped" not in line:
        line["cpu_mode"] = True  # RLHF_GPU_CHECKS_ON_CPU: plumbing only
    out.write_text(json.dumps(line) + "\n")
    print(f"[{name}] {json.dumps(line)}", file=sys.stderr, flush=True)
    return 0
