"""Ending a running worker: watchdog EOF, SIGTERM/SIGINT, the grace period, heartbeats."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from workerproc import Workers


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "fakekrun.jsonl"




GRACE_TOLERANCE = 3.0  # seconds a loaded CI machine may add to an expected stop time

SLEEPER = {"exec": "/bin/sleep", "args": ["1000"]}
# Ignores the orderly SIGTERM; says `ready` once it does, so the test knows.
STUBBORN = {"exec": "/bin/sh", "args": ["-c", "trap '' TERM; echo ready; exec sleep 1000"]}


def test_watchdog_eof_stops_the_guest_in_order(workers: Workers,
                                               make_spec: Callable[..., bytes],
                                               log: Path) -> None:
    w = workers.start(make_spec(shutdown_grace=10.0, **SLEEPER), log=log)
    assert w.status_line() == "entering"
    t0 = time.monotonic()
    w.close_watchdog()
    assert w.wait() == 128 + signal.SIGTERM  # the guest's own end: SIGTERM from the "VMM"
    assert time.monotonic() - t0 < GRACE_TOLERANCE
    assert "the daemon is gone (EOF on fd 97): asking the guest to shut down" in w.output()
    assert w.calls_named("exit") == [{"fn": "exit", "status": 128 + signal.SIGTERM}]


def test_watchdog_eof_forces_exit_6_after_the_grace_period(
        workers: Workers, make_spec: Callable[..., bytes], log: Path) -> None:
    grace = 0.5
    w = workers.start(make_spec(shutdown_grace=grace, **STUBBORN), log=log)
    assert w.console is not None and w.console.readline(20) == "ready"
    t0 = time.monotonic()
    w.close_watchdog()
    assert w.wait() == 6
    elapsed = time.monotonic() - t0
    assert grace <= elapsed < grace + GRACE_TOLERANCE
    assert "the guest did not stop within 0.5 s; exit status 6" in w.output()


def test_sigterm_stops_the_guest_in_order(workers: Workers,
                                          make_spec: Callable[..., bytes], log: Path) -> None:
    w = workers.start(make_spec(shutdown_grace=10.0, **SLEEPER), log=log)
    assert w.status_line() == "entering"
    t0 = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait() == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < GRACE_TOLERANCE
    # In order: the test double saw its "guest" end and exited with its status.
    assert w.calls_named("exit") == [{"fn": "exit", "status": 128 + signal.SIGTERM}]
    assert "msbd-worker: SIGTERM: asking the guest to shut down (grace 10 s)" in w.output()


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_signal_forces_exit_after_the_grace_period(workers: Workers,
                                                   make_spec: Callable[..., bytes], log: Path,
                                                   signo: int) -> None:
    grace = 0.5
    w = workers.start(make_spec(shutdown_grace=grace, **STUBBORN), log=log)
    assert w.console is not None and w.console.readline(20) == "ready"
    t0 = time.monotonic()
    os.kill(w.pid, signo)
    assert w.wait() == 128 + signo
    assert grace <= time.monotonic() - t0 < grace + GRACE_TOLERANCE


def test_a_second_sigterm_forces_exit_at_once(workers: Workers,
                                              make_spec: Callable[..., bytes],
                                              log: Path) -> None:
    w = workers.start(make_spec(shutdown_grace=600.0, **STUBBORN), log=log)
    assert w.console is not None and w.console.readline(20) == "ready"
    os.kill(w.pid, signal.SIGTERM)
    assert (w.console.readline(20)
            == "msbd-worker: SIGTERM: asking the guest to shut down (grace 600 s)")
    t0 = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait() == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < GRACE_TOLERANCE


def test_heartbeats_arrive_at_the_set_interval(workers: Workers,
                                               make_spec: Callable[..., bytes],
                                               log: Path) -> None:
    interval, count = 0.2, 5
    w = workers.start(make_spec(heartbeat_interval=interval, **SLEEPER), log=log)
    assert w.status_line() == "entering"
    t0 = time.monotonic()
    for _ in range(count):
        assert w.status_line(5, skip_heartbeats=False) == "heartbeat"
    elapsed = time.monotonic() - t0
    assert interval * count * 0.9 <= elapsed < interval * count + 0.5 * GRACE_TOLERANCE
    w.close_watchdog()
    assert w.wait() == 128 + signal.SIGTERM


def test_heartbeats_stop_when_the_daemon_closes_the_status_pipe(
        workers: Workers, make_spec: Callable[..., bytes], log: Path) -> None:
    w = workers.start(make_spec(heartbeat_interval=0.05, **SLEEPER), log=log)
    assert w.status is not None and w.status_line() == "entering"
    os.close(w.status.fd)
    w.status = None
    # EPIPE stops the heartbeat thread, not the worker or its guest.
    assert w.console is not None
    assert w.console.readline(20) == "msbd-worker: the status pipe is closed: no more heartbeats"
    w.close_watchdog()
    assert w.wait() == 128 + signal.SIGTERM
    assert w.calls_named("exit") == [{"fn": "exit", "status": 128 + signal.SIGTERM}]
    assert "Traceback" not in w.output()
