"""Real-time priority: the event loop's thread while it has urgent work, the database's
thread for good, and nothing else. Real daemons, real workers (the libkrun test double),
policies read back from the kernel; the hold's logic on this test's own thread."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from daemonproc import DaemonProc
from tenants import sleeper

from msbd.daemon.priority import LATE, LoopPriority, describe
from msbd.daemon.timers import Scheduler, TimerKind

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="real-time scheduling needs root "
                                "(CAP_SYS_NICE); CI runs as root")


def policies(pid: int) -> dict[int, str]:
    """{tid: policy} of every thread of `pid`."""
    return {int(t): describe(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def timers(d: DaemonProc) -> dict[str, Any]:
    result: dict[str, Any] = d.call("daemon.info")["timers"]
    return result


def wait_for(fact: Callable[[], bool], what: str, guard: float = 30.0) -> None:
    end = time.monotonic() + guard
    while not fact():
        assert time.monotonic() < end, f"not within {guard} s: {what}"
        time.sleep(0.02)


@needs_root
def test_the_loop_is_real_time_for_a_signal_and_normal_again_after_the_hold(
        make_daemon: Callable[..., DaemonProc], fakekrun: Path, busybox_root: Path) -> None:
    # No timer may fire during the test (one late by over 5 ms would raise the loop too).
    d = make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 60.0})
    assert d.proc is not None
    pid = d.proc.pid
    info = d.call("sandbox.run", sleeper("rt", busybox_root))
    worker = info["run"]["pid"]
    # Nothing urgent yet (a launch is not): the loop at normal priority, the database
    # thread real-time for good, every other thread normal.
    daemon_threads = policies(pid)
    assert daemon_threads.pop(pid) == "other"
    assert list(daemon_threads.values()).count("fifo") == 1, daemon_threads
    assert (timers(d)["loop_realtime"], timers(d)["loop_raised"]) == (False, 0)
    # A signal to a worker (one that does not end it): real-time at once, before it went out.
    d.call("sandbox.kill", {"name": "rt", "signal": "SIGWINCH"})
    assert describe(pid) == "fifo"
    assert os.sched_getparam(pid).sched_priority == 1
    assert (timers(d)["loop_realtime"], timers(d)["loop_raised"]) == (True, 1)
    # The worker (and so the guest) and the pool's idle workers: normal priority.
    assert set(policies(worker).values()) == {"other"}
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) >= 2
    for child in map(int, children):
        assert set(policies(child).values()) == {"other"}, child
    # A second of calm: back to normal, and raised again by the next urgent work.
    wait_for(lambda: describe(pid) == "other", "the loop back at normal priority")
    assert timers(d)["loop_realtime"] is False
    assert d.call("sandbox.get", {"name": "rt"})["state"] == "running"
    d.call("sandbox.stop", {"name": "rt"})
    assert timers(d)["loop_raised"] >= 2
    said = d.stderr()
    assert "event loop: real-time priority (SCHED_FIFO 1) while it has urgent work" in said
    assert "database thread: real-time priority" in said


@needs_root
def test_a_worker_exit_alone_raises_the_loop(make_daemon: Callable[..., DaemonProc],
                                             fakekrun: Path, busybox_root: Path) -> None:
    """No signal, no timer: a guest that ends by itself; the exit is urgent work."""
    d = make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 60.0})
    d.call("sandbox.run", sleeper("short", busybox_root, args=["true"]))
    wait_for(lambda: d.call("sandbox.get", {"name": "short"})["state"] == "stopped",
             "the run's end")
    assert timers(d)["loop_raised"] == 1


@needs_root
def test_realtime_loop_false_keeps_normal_priority(make_daemon: Callable[..., DaemonProc]
                                                   ) -> None:
    d = make_daemon(settings={"realtime_loop": False})
    assert d.proc is not None
    assert set(policies(d.proc.pid).values()) == {"other"}
    assert "event loop: normal priority (realtime_loop = false)" in d.stderr()
    assert timers(d)["loop_raised"] == 0


@needs_root
def test_a_refused_real_time_priority_is_said_and_the_loop_runs_normally() -> None:
    """Without CAP_SYS_NICE (as under an unprivileged user, or RestrictRealtime=) the call
    is refused: the loop stays at normal priority and the reason is given."""
    code = ("import os; from msbd.daemon import priority; print(priority.apply(True)); "
            "loop = priority.LoopPriority(True); print(loop.probe()); loop.urgent(); "
            "print(priority.describe(0), loop.realtime, loop.raised)")
    result = subprocess.run(
        ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice",
         sys.executable, "-c", code],
        capture_output=True, text=True, check=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent)
    said, said_loop, after = result.stdout.splitlines()
    assert said.startswith("normal priority: real-time scheduling refused"), said
    assert said_loop.startswith("normal priority: real-time scheduling refused"), said_loop
    assert after == "other False 0"


@pytest.fixture
def loop_priority() -> Iterator[Callable[..., LoopPriority]]:
    """LoopPriority on this test's thread, put back to normal priority afterwards."""
    made: list[LoopPriority] = []

    def make(enabled: bool = True, hold: float = 0.05) -> LoopPriority:
        made.append(LoopPriority(enabled, hold=hold))
        return made[-1]

    try:
        yield make
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@needs_root
async def test_urgent_raises_once_and_serve_lowers_after_the_hold(
        loop_priority: Callable[..., LoopPriority]) -> None:
    loop = loop_priority(hold=0.2)
    assert loop.probe().startswith("real-time priority")
    assert describe(0) == "other"
    async with anyio.create_task_group() as tg:
        await tg.start(loop.serve)
        loop.urgent()
        assert (describe(0), loop.realtime, loop.raised) == ("fifo", True, 1)
        raised_at = time.monotonic()
        loop.urgent()  # while raised: only the hold moves
        assert loop.raised == 1
        with anyio.fail_after(10):
            while loop.realtime:
                await anyio.sleep(0.01)
        assert time.monotonic() - raised_at >= 0.2
        assert describe(0) == "other"
        loop.urgent()
        assert (describe(0), loop.raised) == ("fifo", 2)
        tg.cancel_scope.cancel()
    assert (describe(0), loop.realtime) == ("other", False)  # lowered on the way out


@needs_root
def test_only_lateness_past_the_threshold_is_urgent(
        loop_priority: Callable[..., LoopPriority]) -> None:
    loop = loop_priority()
    loop.late(LATE / 2)
    assert (describe(0), loop.raised) == ("other", 0)
    loop.late(LATE * 2)
    assert (describe(0), loop.raised) == ("fifo", 1)


@needs_root
def test_disabled_never_raises(loop_priority: Callable[..., LoopPriority]) -> None:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))  # as a service manager might
    loop = loop_priority(enabled=False)
    assert loop.probe() == "normal priority (realtime_loop = false)"
    assert describe(0) == "other"
    loop.urgent()
    loop.late(1.0)
    assert (describe(0), loop.realtime, loop.raised) == ("other", False, 0)


async def test_the_scheduler_reports_each_lateness_before_the_fire() -> None:
    now = [100.0]
    seen: list[tuple[str, Any]] = []
    scheduler = Scheduler(clock=lambda: now[0], on_late=lambda late: seen.append(("late", late)))

    def fire(key: Any, kind: TimerKind) -> None:
        seen.append(("fire", key))
        if len(seen) == 4:
            tg.cancel_scope.cancel()

    scheduler.set("a", TimerKind.IDLE, 99.0)
    scheduler.set("b", TimerKind.IDLE, 99.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run, fire)
    assert seen == [("late", 1.0), ("fire", "a"), ("late", 0.5), ("fire", "b")]
