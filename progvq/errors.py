"""Errors that mean "the user asked for something we cannot do".

The command line turns every :class:`ProgvqError` into one line on stderr and
exit status 2; anything else is a bug and keeps its traceback.
"""

import signal


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
