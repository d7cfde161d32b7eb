"""Preemption: SIGTERM (what Kubernetes, SLURM and `ray job stop` send) or SIGUSR1 (SLURM's
`--signal=B:USR1@90` early warning) asks a run to stop at the next step boundary, checkpoint, and exit 0.

    with StopOnSignal() as stop:
        for step in ...:
            ...one step...
            if stop.requested:
                save(); break

The handler only records the signal: the step in progress finishes (its collectives cannot be
abandoned half-way), then the controller writes a checkpoint, so `checkpoint.resume=auto` goes on
from exactly there. The deadline is one step plus one save; a platform's grace period (Kubernetes'
terminationGracePeriodSeconds, SLURM's KillWait) must be longer. A second signal does not hurry it.
"""

from __future__ import annotations

import logging
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
logger = logging.getLogger(__name__)


class StopOnSignal:
    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            logger.warning("%s received: stopping after this step with a checkpoint", self.signal)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
