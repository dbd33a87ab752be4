"""SLURM delivers SIGTERM to the batch script and to every process of the job (scancel --full,
the time limit, preemption); the script forwards its copy. Two SIGTERMs a moment apart are one
stop with one grace period; a later second signal still kills at once."""

from __future__ import annotations

import signal

import pytest
from test_supervisor_arbiter import Harness, _shared_storage  # noqa: F401 (the module's storage fixture)


@pytest.mark.parametrize(
    "second,gap_s,expected",
    [
        (signal.SIGTERM, 0.0, [(101, signal.SIGTERM, False)]),  # the forwarded copy: same stop
        (signal.SIGTERM, 1.5, [(101, signal.SIGTERM, False)]),
        (
            signal.SIGTERM,
            3.0,
            [(101, signal.SIGTERM, False), (101, signal.SIGKILL, True)],
        ),  # a real second one
        (
            signal.SIGINT,
            0.0,
            [(101, signal.SIGTERM, False), (101, signal.SIGKILL, True)],
        ),  # Ctrl-C twice
    ],
)
def test_second_signal_table(tmp_path, second, gap_s, expected):
    h = Harness(tmp_path, grace_period=120.0)
    h.add_worker(1, 101, trial=True)
    h.arbiter.signal_queue.put_nowait(signal.SIGTERM)
    h.arbiter.handle_signals()
    h.clock.now += gap_s
    h.arbiter.signal_queue.put_nowait(second)
    h.arbiter.handle_signals()
    assert h.signals == expected
    assert h.arbiter.stopping and h.arbiter.exit_code == 99
