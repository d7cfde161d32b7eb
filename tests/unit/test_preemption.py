"""StopOnSignal: a SIGTERM or SIGUSR1 is recorded (the first one), not acted on, and the handlers before
the block come back after it."""

import os
import signal

from rlhf_system.preemption import StopOnSignal


def test_the_first_signal_is_recorded_and_the_old_handlers_return():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not replace the first
        assert stop.requested and stop.signal == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before
