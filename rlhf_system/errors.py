"""The two kinds of failure a user sees, and how the CLI reports them.

    UserError   bad input (config, data, model folder, reward, checkpoint): exit status 2. Raised before
                expensive work; the message alone says what, where (file:line, field, sample) and the fix.
    RunFailure  something broke while running (a worker died, a deadline passed, a server went away):
                exit status 1. The message names the role/rank/server; checkpoints already written stay.

Anything else is a bug: exit 1 as well, with the exception's type in the line. Every kind prints ONE
line on stderr; the full traceback goes to a log file (the run folder's error.log when the run has
one), whose path the line gives for failures and bugs. A bad-input line needs no traceback.

Leaf module: no imports from the package, so every layer can raise these.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path


class UserError(ValueError):
    """Bad input, phrased for a user: names the file, line, field or sample, and the fix. Exit 2."""


class RunFailure(RuntimeError):
    """A runtime failure (a process died, a deadline passed, a server is gone). Exit 1."""


EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


def root_cause(e: BaseException) -> BaseException:
    """The user error behind a wrapper: a worker's ConfigError reaches the controller as the cause of
    a GroupCallError, and is still the user's input at fault."""
    seen = e
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__
    return e


def exit_code(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_BAD_INPUT if isinstance(root_cause(e), UserError) else EXIT_FAILURE


def one_line(e: BaseException) -> str:
    """The line for stderr. A multi-line message keeps its lines only for a ConfigError's list of
    problems (one per line); other messages keep their first line (the rest is in the log)."""
    cause = root_cause(e)
    if isinstance(cause, UserError):
        return str(cause).strip() or type(cause).__name__
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(e, (RunFailure, KeyboardInterrupt)):
        return first or type(e).__name__
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def write_log(e: BaseException, run_dir: str | None) -> Path:
    """The traceback, in `run_dir/error.log` if that folder exists (a run that failed before making
    it must not leave one behind), else in the temp folder."""
    text = f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n" + "".join(
        traceback.format_exception(type(e), e, e.__traceback__))
    if run_dir and Path(run_dir).is_dir():
        try:
            with (Path(run_dir) / "error.log").open("a") as f:
                f.write(text + "\n")
            return Path(run_dir) / "error.log"
        except OSError:  # the run's disk may be what failed: the temp folder then
            pass
    folder = Path(tempfile.gettempdir()) / "rlhf-errors"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(text + "\n")
    return path


def report(e: BaseException, run_dir: str | None, hint: str = "") -> tuple[str, int]:
    """(the stderr line, the exit status) for an exception that reached the CLI."""
    code = exit_code(e)
    line = one_line(e)
    if code == EXIT_INTERRUPTED:
        return "interrupted" + (f"; {hint}" if hint else ""), code
    try:
        log = write_log(e, run_dir)
    except OSError:  # a full disk must not replace the error being reported
        log = None
    if code == EXIT_BAD_INPUT:
        return line, code
    where = f" (traceback: {log})" if log else ""
    return line + (f"; {hint}" if hint else "") + where, code


def cleanup(failed: bool, *steps) -> None:
    """Run every cleanup step (close trackers, stop workers). While a failure is on its way out
    (`failed`), a cleanup error is logged, never raised: it would replace the error the user needs.
    After a success the first cleanup error is raised once every step has run."""
    import logging

    first = None
    for fn in steps:
        try:
            fn()
        except Exception as e:
            if failed:
                logging.getLogger(__name__).warning("cleanup after the failure also failed: %s: %s",
                                                    type(e).__name__, e)
            elif first is None:
                first = e
    if first is not None:
        raise first
