"""Ctrl-C, SIGTERM and SIGHUP ask a run to stop after its step; a second signal stops at once."""

import os
import signal

import pytest

from mlx_aim.errors import ExitCode, Interrupted
from mlx_aim.train.stopping import StopSignals


def test_the_stop_signals_are_caught_while_a_run_lasts_and_then_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # without the handler this would end pytest
        assert stop.requested == signal.SIGTERM
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize(
    "signum, code",
    [
        (signal.SIGINT, ExitCode.INTERRUPTED),
        (signal.SIGTERM, ExitCode.TERMINATED),
        (signal.SIGHUP, ExitCode.HANGUP),
    ],
)
def test_a_second_signal_stops_at_once_with_128_plus_its_number(signum, code):
    stop = StopSignals(enabled=False)
    stop.handle(signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        stop.handle(signum)
    assert e.value.exit_code == code == 128 + signum
    assert stop.requested == signal.SIGINT  # the first one is what the run reports
