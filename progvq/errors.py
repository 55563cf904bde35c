"""Errors that mean "the user asked for something we cannot do".

The command line turns every :class:`ProgvqError` into one line on stderr and
exit status 2; anything else is a bug and keeps its traceback.
"""

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class ProgvqError(Exception):
    """Base class for user-facing errors (bad config, bad data, bad run dir)."""


class ConfigError(ProgvqError):
    """A config file or override is malformed, unknown or out of range."""


class DataError(ProgvqError):
    """A data source is missing, unreadable or inconsistent."""


class RunError(ProgvqError):
    """A run directory or checkpoint cannot be used as asked."""


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after writing a checkpoint at ``step``."""

    def __init__(self, signal_name: str, stage: str, step: int, steps: int, path: str) -> None:
        super().__init__(
            f"{signal_name}: stage {stage} stopped at step {step} of {steps}; checkpoint written to {path}"
        )
        self.signal_name = signal_name
        self.stage = stage
        self.step = step
        self.steps = steps
        self.path = path


class Terminated(BaseException):
    """A command other than training was stopped by SIGTERM or SIGHUP.

    Raised from the signal handler so that every ``finally`` runs: temporary files are removed
    and no output is left half-written. A BaseException, as KeyboardInterrupt is: no
    ``except Exception`` may swallow it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


@contextmanager
def signal_handlers(signals: Iterable[int], handler: Callable[[int, Any], Any]) -> Iterator[None]:
    """``handler`` for each of ``signals`` for the length of the block, the previous handlers put back after.

    Python runs handlers in the main thread only and lets only it set them: from another thread
    the block runs with the handlers as they are.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
