"""The event loop's and the database's threads at a real-time priority, and nothing else:
real daemons, real workers (the libkrun test double), policies read back from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from daemonproc import DaemonProc
from tenants import sleeper

from msbd.daemon.priority import describe

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="real-time scheduling needs root "
                                "(CAP_SYS_NICE); CI runs as root")


def policies(pid: int) -> dict[int, str]:
    """{tid: policy} of every thread of `pid`."""
    return {int(t): describe(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


@needs_root
def test_only_the_loop_and_database_threads_are_real_time(make_daemon: Callable[..., DaemonProc],
                                           fakekrun: Path, busybox_root: Path) -> None:
    d = make_daemon(libkrun=fakekrun, settings={"heartbeat_interval": 0.2})
    assert d.proc is not None
    pid = d.proc.pid
    info = d.call("sandbox.run", sleeper("rt", busybox_root))
    worker = info["run"]["pid"]
    daemon_threads = policies(pid)
    assert daemon_threads.pop(pid) == "fifo"  # the main thread runs the loop
    assert os.sched_getparam(pid).sched_priority == 1
    # And the database thread; any other (anyio's) at normal priority.
    fifo = [tid for tid, policy in daemon_threads.items() if policy == "fifo"]
    assert len(fifo) == 1, daemon_threads
    assert "database thread: real-time priority" in d.stderr()
    # The worker (and so the guest) and the pool's idle workers: normal priority.
    assert set(policies(worker).values()) == {"other"}
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) >= 2
    for child in map(int, children):
        assert set(policies(child).values()) == {"other"}, child
    assert "event loop: real-time priority" in d.stderr()


@needs_root
def test_realtime_loop_false_keeps_normal_priority(make_daemon: Callable[..., DaemonProc]
                                                   ) -> None:
    d = make_daemon(settings={"realtime_loop": False})
    assert d.proc is not None
    assert set(policies(d.proc.pid).values()) == {"other"}
    assert "event loop: normal priority (realtime_loop = false)" in d.stderr()


@needs_root
def test_a_refused_real_time_priority_is_said_and_the_loop_runs_normally() -> None:
    """Without CAP_SYS_NICE (as under an unprivileged user, or RestrictRealtime=) the call
    is refused: the loop stays at normal priority and the reason is given."""
    code = ("import os; from msbd.daemon import priority; print(priority.apply(True)); "
            "print(priority.describe(0))")
    result = subprocess.run(
        ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice",
         sys.executable, "-c", code],
        capture_output=True, text=True, check=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent)
    said, policy = result.stdout.splitlines()
    assert said.startswith("normal priority: real-time scheduling refused"), said
    assert policy == "other"
