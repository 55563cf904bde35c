"""The errors: which ones the command line reports in one line, and what an interruption carries."""

from __future__ import annotations

import pytest

from progvq.errors import ConfigError, DataError, Interrupted, ProgvqError, RunError


@pytest.mark.parametrize("error", [ConfigError, DataError, RunError])
def test_user_errors_are_progvq_errors(error: type[Exception]) -> None:
    assert issubclass(error, ProgvqError) and issubclass(error, Exception)
    with pytest.raises(ProgvqError, match="one line"):
        raise error("one line")


def test_an_interruption_is_no_user_error_and_names_where_it_stopped() -> None:
    assert not issubclass(Interrupted, ProgvqError)
    stop = Interrupted("SIGTERM", "2", 40, 100, "runs/x/stage-2/checkpoint.pt")
    assert str(stop) == "SIGTERM: stage 2 stopped at step 40 of 100; checkpoint written to runs/x/stage-2/checkpoint.pt"
    assert (stop.signal_name, stop.stage, stop.step, stop.steps, stop.path) == (
        "SIGTERM",
        "2",
        40,
        100,
        "runs/x/stage-2/checkpoint.pt",
    )
