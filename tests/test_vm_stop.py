"""Ending a running worker: SIGTERM/SIGINT and watchdog EOF ask the guest to stop over the
control channel (the test double plays the guest init's part), the grace, the worker's own
forced exit, heartbeats."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from workerproc import Worker, Workers


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "fakekrun.jsonl"


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A FIFO the test double's init waits on before it dials the host (FAKEKRUN_CONTROL_GATE),
    and the test's end of it: writing a byte lets the init connect."""
    path = tmp_path / "gate"
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    yield path, fd
    os.close(fd)


GRACE_TOLERANCE = 3.0  # seconds a loaded CI machine may add to an expected stop time

SLEEPER = {"exec": "/bin/sleep", "args": ["1000"]}
# Ends with its own code on SIGTERM (its shell runs the trap between two short sleeps).
POLITE = {"exec": "/bin/sh",
          "args": ["-c", "trap 'exit 42' TERM; echo ready; while :; do sleep 0.1; done"]}
# Ignores the orderly SIGTERM; says `ready` once it does, so the test knows.
STUBBORN = {"exec": "/bin/sh", "args": ["-c", "trap '' TERM; echo ready; exec sleep 1000"]}


INFO = 3  # the log level at which the worker says what the guest's init does
CONNECTED = "msbd-worker: control channel: the guest's init connected"
STARTED = "msbd-worker: control channel: the guest's init says 'started'"
SAYS = "msbd-worker: control channel: the guest's init says "


def console_until(w: Worker, *wanted: str) -> list[str]:
    """Console lines up to all of `wanted`, which may come in any order (the workload,
    the worker's threads and the test double's init write independently)."""
    assert w.console is not None
    seen: list[str] = []
    missing = set(wanted)
    while missing:
        line = w.console.readline(20)
        assert line is not None, f"EOF before {missing}; got {seen}"
        seen.append(line)
        missing.discard(line)
    return seen


def connected(w: Worker, *also: str) -> None:
    """Wait until the worker took the guest init's connection and heard `started`
    (said at log level 3), and for the other lines `also`."""
    assert w.status_line() == "entering"
    console_until(w, CONNECTED, STARTED, *also)


def ready(w: Worker) -> None:
    assert w.console is not None and w.console.readline(20) == "ready"


def rest(w: Worker) -> list[str]:
    """The rest of the console, without what the guest's init said last: `exit N` may or
    may not be read before the process ends with it."""
    return [ln for ln in w.output().splitlines() if not ln.startswith(SAYS + "'exit ")]


def stop_lines(w: Worker) -> list[str]:
    return [c["line"] for c in w.calls_named("control_recv")]


def signals(w: Worker) -> list[int]:
    return [c["signal"] for c in w.calls_named("guest_signal")]


def test_sigterm_stops_the_guest_over_the_control_channel(
        workers: Workers, make_spec: Callable[..., bytes], log: Path) -> None:
    w = workers.start(make_spec(shutdown_grace=10.0, log_level=INFO, **POLITE), log=log)
    connected(w, "ready")
    t0 = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait() == 42  # the workload's own code, through the init and libkrun
    assert time.monotonic() - t0 < GRACE_TOLERANCE
    assert rest(w) == [
        "msbd-worker: SIGTERM: asking the guest to stop over the control channel (grace 10 s)",
        "msbd-init: stopping (stop from the host): SIGTERM to every process, SIGKILL after "
        "10000 ms"]
    assert stop_lines(w) == ["stop 10"]
    assert signals(w) == [signal.SIGTERM]
    assert w.calls_named("exit") == [{"fn": "exit", "status": 42}]
    sent = [c["line"] for c in w.calls_named("control_send")]
    assert sent == ["started", "exit 42"]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fd 97 EOF"])
def test_a_guest_ignoring_sigterm_is_killed_after_the_grace(
        workers: Workers, make_spec: Callable[..., bytes], log: Path, how: str) -> None:
    grace = 0.5
    w = workers.start(make_spec(shutdown_grace=grace, log_level=INFO, **STUBBORN), log=log)
    connected(w, "ready")
    t0 = time.monotonic()
    if how == "fd 97 EOF":
        w.close_watchdog()
    else:
        os.kill(w.pid, signal.Signals[how])
    assert w.wait() == 128 + signal.SIGKILL  # the init's SIGKILL, not the worker's own exit
    assert grace <= time.monotonic() - t0 < grace + GRACE_TOLERANCE
    why = "the daemon is gone (EOF on fd 97)" if how == "fd 97 EOF" else how
    assert rest(w) == [
        f"msbd-worker: {why}: asking the guest to stop over the control channel (grace 0.5 s)",
        "msbd-init: stopping (stop from the host): SIGTERM to every process, SIGKILL after "
        "500 ms",
        "msbd-init: grace over: SIGKILL to every process"]
    assert stop_lines(w) == ["stop 0.5"]
    assert signals(w) == [signal.SIGTERM, signal.SIGKILL]
    assert w.calls_named("exit") == [{"fn": "exit", "status": 137}]


def test_watchdog_eof_stops_the_guest_in_order(workers: Workers,
                                               make_spec: Callable[..., bytes],
                                               log: Path) -> None:
    w = workers.start(make_spec(shutdown_grace=10.0, log_level=INFO, **SLEEPER), log=log)
    connected(w)
    t0 = time.monotonic()
    w.close_watchdog()
    assert w.wait() == 128 + signal.SIGTERM  # the guest's own end: the init's SIGTERM
    assert time.monotonic() - t0 < GRACE_TOLERANCE
    assert ("msbd-worker: the daemon is gone (EOF on fd 97): asking the guest to stop over "
            "the control channel (grace 10 s)\n") in w.output()
    assert w.calls_named("exit") == [{"fn": "exit", "status": 128 + signal.SIGTERM}]


def test_a_stop_before_the_guest_connected_is_sent_when_it_does(
        workers: Workers, make_spec: Callable[..., bytes], log: Path,
        gate: tuple[Path, int]) -> None:
    path, release = gate
    w = workers.start(make_spec(shutdown_grace=10.0, **POLITE), log=log,
                      env={"FAKEKRUN_CONTROL_GATE": str(path)})
    assert w.status_line() == "entering"
    ready(w)
    t0 = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)
    assert w.console is not None
    assert w.console.readline(20) == (
        "msbd-worker: SIGTERM: the guest's init has not connected to the control channel yet; "
        "asking it to stop once it does (grace 10 s)")
    os.write(release, b"x")  # the guest's init dials the host now
    line = w.console.readline(20)
    assert line is not None
    assert re.fullmatch(r"msbd-worker: the guest's init connected: asking it to stop over the "
                        r"control channel \(\d+\.\d s of the grace left\)", line), line
    assert w.wait() == 42
    assert time.monotonic() - t0 < GRACE_TOLERANCE
    [stop] = stop_lines(w)
    seconds = float(stop.removeprefix("stop "))
    assert 10.0 - GRACE_TOLERANCE < seconds <= 10.0  # what was left of the grace


@pytest.mark.parametrize(("mode", "what"), [
    ("none", "its init never connected to the control channel"),
    ("deaf", "its init did not end the run"),  # connected, said `started`, ignored `stop`
])
@pytest.mark.parametrize(("how", "status"), [("fd 97 EOF", 6), ("SIGTERM", 143)])
def test_the_worker_exits_by_force_when_the_guest_does_not_end(
        workers: Workers, make_spec: Callable[..., bytes], log: Path, mode: str,
        what: str, how: str, status: int) -> None:
    """The thread that asked waits out the grace: the watchdog's, or the signal thread."""
    grace, margin = 0.3, 0.4
    w = workers.start(make_spec(shutdown_grace=grace, shutdown_margin=margin, log_level=INFO,
                                **SLEEPER), log=log, env={"FAKEKRUN_CONTROL": mode})
    if mode == "deaf":
        connected(w)
    else:
        assert w.status_line() == "entering"
    t0 = time.monotonic()
    if how == "SIGTERM":
        os.kill(w.pid, signal.SIGTERM)
    else:
        w.close_watchdog()
    assert w.wait() == status
    assert grace + margin <= time.monotonic() - t0 < grace + margin + GRACE_TOLERANCE
    assert w.output().splitlines()[-1] == (
        f"msbd-worker: the guest did not stop within its grace of 0.3 s and 0.4 s more "
        f"({what}); exit status {status}")
    assert w.calls_named("exit") == []  # forced: the test double never saw its guest end
    assert stop_lines(w) == (["stop 0.3"] if mode == "deaf" else [])


def test_only_libkrun_may_connect_and_only_once(
        workers: Workers, make_spec: Callable[..., bytes], log: Path, tmp_path: Path,
        gate: tuple[Path, int]) -> None:
    path, release = gate
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    w = workers.start(make_spec(log_level=INFO, **POLITE), log=log,
                      env={"FAKEKRUN_CONTROL_GATE": str(path), "TMPDIR": str(tmpdir)})
    assert w.status_line() == "entering"
    # libkrun got the socket as /proc/self/fd/N: its file and directory are gone already.
    node = w.control_socket()
    assert re.fullmatch(r"/proc/self/fd/\d+", str(node)), node
    assert list(tmpdir.iterdir()) == []
    reach = f"/proc/{w.pid}/fd/{node.name}"
    # Another process (this test) gets there first: the worker closes it at once.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as intruder:
        intruder.settimeout(20)
        intruder.connect(reach)
        assert intruder.recv(100) == b""
    assert console_until(w, "ready", f"msbd-worker: control channel: refused a connection "
                                     f"from pid {os.getpid()}: only libkrun, inside this "
                                     "worker, may connect")
    os.write(release, b"x")  # now the guest's init dials the host
    console_until(w, CONNECTED, STARTED)
    # libkrun's connection taken: nothing else can connect any more.
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)), \
            socket.socket(socket.AF_UNIX) as late:
        late.connect(reach)
    os.kill(w.pid, signal.SIGTERM)  # and the channel works
    assert w.wait() == 42
    [dial] = w.calls_named("control_connect")
    assert (dial["ok"], dial["path"], dial["euid"]) == (True, str(node), os.geteuid())


def test_without_a_control_channel_a_signal_exits_at_once(
        workers: Workers, make_spec: Callable[..., bytes], log: Path,
        fakekrun_old: Path) -> None:
    w = workers.start(make_spec(libkrun=str(fakekrun_old), **SLEEPER), log=log)
    assert w.status_line() == "entering"
    t0 = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait() == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < GRACE_TOLERANCE
    assert w.output() == (
        "msbd-worker: SIGTERM: this libkrun has no way to ask its guest to stop (no control "
        "channel, no shutdown eventfd), exiting now; exit status 143\n")
    [call] = w.calls_named("krun_set_exec")
    assert call["envp"] == ["MSBD_STOP_GRACE=10"]  # no MSBD_CONTROL_PORT: no channel
    assert w.calls_named("krun_add_vsock_port2", "control_connect", "exit") == []


def sigterm_seen_through(w: Worker) -> None:
    """SIGTERM to a worker with a 600 s grace; wait until its guest's init acted on it."""
    os.kill(w.pid, signal.SIGTERM)
    assert w.console is not None
    assert w.console.readline(20) == ("msbd-worker: SIGTERM: asking the guest to stop over the "
                                      "control channel (grace 600 s)")
    assert w.console.readline(20) == ("msbd-init: stopping (stop from the host): SIGTERM to "
                                      "every process, SIGKILL after 600000 ms")


def test_a_second_sigterm_forces_exit_at_once(workers: Workers,
                                              make_spec: Callable[..., bytes],
                                              log: Path) -> None:
    w = workers.start(make_spec(shutdown_grace=600.0, log_level=INFO, **STUBBORN), log=log)
    connected(w, "ready")
    sigterm_seen_through(w)
    t0 = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait() == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < GRACE_TOLERANCE
    assert w.console is not None
    assert w.console.readline(20) == "msbd-worker: SIGTERM again: exiting now; exit status 143"


def threads(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def test_a_stop_starts_no_thread(workers: Workers, make_spec: Callable[..., bytes],
                                 log: Path) -> None:
    """Every thread a stop needs exists before it: one that could not be made then (a
    pids limit, no memory) must not leave a worker that never stops."""
    w = workers.start(make_spec(shutdown_grace=600.0, heartbeat_interval=0.1, log_level=INFO,
                                **STUBBORN), log=log)
    connected(w, "ready")
    before = threads(w.pid)
    sigterm_seen_through(w)
    # Watched over three heartbeats: a thread started for the stop would show in that time.
    for _ in range(3):
        assert threads(w.pid) == before
        assert w.status_line(5, skip_heartbeats=False) == "heartbeat"
    assert threads(w.pid) == before
    w.close_watchdog()  # the daemon gone as well: asked already, nothing more to start
    assert threads(w.pid) <= before
    os.kill(w.pid, signal.SIGTERM)
    assert w.wait() == 128 + signal.SIGTERM


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
