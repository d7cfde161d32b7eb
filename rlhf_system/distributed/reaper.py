"""A watchdog that stops a controller's processes when the controller dies without cleaning up.

    python -m rlhf_system.distributed.reaper CONTROLLER_PID      (started by placement/group.ensure_ray)

When the controller starts a local Ray cluster and is then SIGKILLed (the OOM killer, `kill -9`, a
crashed node agent), nothing runs its shutdown: Ray's dashboard and runtime-env agents outlive the
raylet for good, and vLLM's workers for seconds to minutes, holding memory and ports. This process,
in a session of its own, notes the controller's descendants (pid and start time, so a reused pid is
never touched) every POLL_S; once the controller is gone it sends SIGTERM to the ones still alive and
their children, SIGKILL after GRACE_S, and exits. After a clean shutdown it finds nothing to do.
Only local clusters get one: on a cluster the controller joined (RAY_ADDRESS), Ray's GCS ends a dead
driver's actors itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 5.0


def _key(p: psutil.Process) -> tuple[int, float] | None:
    try:
        return p.pid, p.create_time()
    except psutil.Error:
        return None


def _alive(known: dict[int, float]) -> list[psutil.Process]:
    out = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                out.append(p)
        except psutil.Error:
            continue
    return out


def watch(controller: int) -> int:
    """Returns how many processes had to be stopped."""
    try:
        parent = psutil.Process(controller)
        started = parent.create_time()
    except psutil.Error:
        return 0
    known: dict[int, float] = {}
    while True:
        try:
            if parent.create_time() != started or parent.status() == psutil.STATUS_ZOMBIE:
                break
            for child in parent.children(recursive=True):
                key = _key(child)
                if key and key[0] != os.getpid():  # the reaper is the controller's child too
                    known[key[0]] = key[1]
        except psutil.Error:  # the controller is gone
            break
        time.sleep(POLL_S)
    left = _alive(known)
    for p in list(left):  # orphans re-parented elsewhere may have started children of their own
        try:
            left += [c for c in p.children(recursive=True) if c.pid not in known and c.pid != os.getpid()]
        except psutil.Error:
            pass
    for p in left:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(left, timeout=GRACE_S)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(left)


def start(controller: int | None = None) -> subprocess.Popen:
    """Start a reaper for `controller` (default: this process) in its own session."""
    return subprocess.Popen([sys.executable, "-m", "rlhf_system.distributed.reaper", str(controller or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
