"""Real-time priority for the daemon's loop while it has urgent work, and for its database thread.

Why
---
The loop decides every stop, fires every deadline and answers every call, and
on a busy host it competes for the CPU with the very workers it supervises.
Each signal it sends wakes a worker, and a woken worker preempts the sender:
measured on 2 cores, a thousand SIGTERMs sent from the loop took 559 ms of
wall time for 144 ms of the loop's CPU, with 860 involuntary context switches,
and the loop fell a second behind its deadlines. A nice value of -10 for the
loop, nice 10 or SCHED_BATCH for the workers did not change that (the woken
task still preempted); SCHED_FIFO did: the same thousand signals in 32 ms of
wall time and CPU alike, no preemption (BENCHMARKS.md, "The loop at a
real-time priority").

Why not always
--------------
A real-time loop runs the moment anything wakes it, so under many clients it
reads one request per wake-up where a normal one, scheduled a little later,
reads several: 16 clients' pings cost 17.9 us of the daemon's CPU each at
SCHED_FIFO against 9.7 us at normal priority (BENCHMARKS.md). So the loop is
real-time only while it has urgent work, and normal otherwise.

What
----
`LoopPriority.urgent()` is called where the loop's work cannot wait: before a
signal goes to a worker (the stops of a burst), when a worker has exited (the
ends of a burst: reaping, recording), and when a deadline fires more than
`LATE` seconds late (something is holding the loop up). It raises the loop's
thread to `SCHED_FIFO` priority 1, the lowest, and keeps it there until
`HOLD` seconds pass with nothing urgent; `serve` then puts it back. One
system call each way; calls while raised only move the hold's end.

The database thread, which the loop waits on (its commits, and the GIL
whenever that thread holds it), stays at SCHED_FIFO 1 for good (`apply`): it
wakes only for work the loop handed it, so there is nothing to batch.

Both are set with `SCHED_RESET_ON_FORK`: every thread and process created
after it starts as `SCHED_OTHER`, so the workers and so the guests run at
normal priority. Neither thread does long work; should one ever spin, the
kernel's real-time throttling (`sched_rt_runtime_us`, 95% of each second by
default) still leaves every CPU to other tasks.

When the host refuses (no CAP_SYS_NICE, RLIMIT_RTPRIO 0, systemd's
`RestrictRealtime=`, a cgroup without a real-time budget), both run at
normal priority and the daemon says why, once. `realtime_loop = false`
turns it off (and puts threads that a service manager made real-time back
to normal priority).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Final

import anyio
import anyio.abc

log = logging.getLogger("msbd.priority")

REALTIME_POLICIES: Final = frozenset({os.SCHED_FIFO, os.SCHED_RR})
LOOP_PRIORITY: Final = 1
HOLD: Final = 1.0
"""Seconds the loop stays real-time after its last urgent work."""
LATE: Final = 0.005
"""A deadline this late (seconds) makes the loop's work urgent."""


def apply(enabled: bool) -> str:
    """Set the calling thread's policy for good, as the setting says (the database thread's);
    what it runs at, for the log."""
    current = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
    if not enabled:
        if current in REALTIME_POLICIES:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        return "normal priority (realtime_loop = false)"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                              os.sched_param(LOOP_PRIORITY))
    except OSError as exc:
        if current in REALTIME_POLICIES:
            return f"real-time priority {os.sched_getparam(0).sched_priority}, as started"
        return (f"normal priority: real-time scheduling refused ({exc.strerror}; it needs "
                "CAP_SYS_NICE or RLIMIT_RTPRIO, and no RestrictRealtime=)")
    return f"real-time priority (SCHED_FIFO {LOOP_PRIORITY}, reset for every thread and child)"


def _set(tid: int, realtime: bool) -> None:
    if realtime:
        os.sched_setscheduler(tid, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                              os.sched_param(LOOP_PRIORITY))
    else:  # keeping the flag: a thread without CAP_SYS_NICE may not clear it
        os.sched_setscheduler(tid, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))


class LoopPriority:
    """The loop thread's priority: real-time from `urgent()` until `HOLD` seconds of calm.

    Create it on the loop's thread (that thread is the one raised); `urgent`
    is called from it, never blocks, and costs one system call only when it
    raises. `serve` lowers the priority again once the hold is over.
    """

    def __init__(self, enabled: bool, *, hold: float = HOLD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tid = threading.get_native_id()
        self._hold = hold
        self._clock = clock
        self._until = -math.inf
        self._wake: anyio.Event | None = None
        self.enabled = enabled
        self.realtime = False
        self.raised = 0
        """How many times the loop was raised (for `daemon.info` and tests)."""

    def probe(self) -> str:
        """Check that the host allows the raise (raise and lower once); what the loop gets."""
        current = os.sched_getscheduler(self._tid) & ~os.SCHED_RESET_ON_FORK
        if current in REALTIME_POLICIES:  # a service manager's choice: start from normal
            _set(self._tid, False)
        if not self.enabled:
            return "normal priority (realtime_loop = false)"
        try:
            _set(self._tid, True)
        except OSError as exc:
            self.enabled = False
            return (f"normal priority: real-time scheduling refused ({exc.strerror}; it needs "
                    "CAP_SYS_NICE or RLIMIT_RTPRIO, and no RestrictRealtime=)")
        _set(self._tid, False)
        return (f"real-time priority (SCHED_FIFO {LOOP_PRIORITY}) while it has urgent work "
                f"and {self._hold:g} s after, normal priority otherwise")

    def urgent(self) -> None:
        """The loop has work that cannot wait: real-time now, until `hold` of calm."""
        if not self.enabled:
            return
        self._until = self._clock() + self._hold
        if self.realtime:
            return
        try:
            _set(self._tid, True)
        except OSError as exc:  # taken away since the probe (a cgroup's budget, a policy)
            self.enabled = False
            log.warning("event loop: real-time priority refused from now on (%s)", exc.strerror)
            return
        self.realtime = True
        self.raised += 1
        if self._wake is not None:
            self._wake.set()

    def late(self, seconds: float) -> None:
        """A deadline fired `seconds` late: urgent when that is over `LATE`."""
        if seconds > LATE:
            self.urgent()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]
                    = anyio.TASK_STATUS_IGNORED) -> None:
        """Lower the loop again after each hold, until cancelled (then lower it at once)."""
        started = False
        try:
            while True:
                self._wake = anyio.Event()
                if not started:
                    task_status.started()
                    started = True
                if not self.realtime:
                    await self._wake.wait()
                    continue
                left = self._until - self._clock()
                if left > 0:
                    await anyio.sleep(math.ceil(left * 1000) / 1000)
                    continue
                self._lower()
        finally:
            self._wake = None
            self._lower()

    def _lower(self) -> None:
        if self.realtime:
            self.realtime = False
            try:
                _set(self._tid, False)
            except OSError as exc:  # lowering is always allowed; say so if it ever is not
                log.warning("event loop: cannot return to normal priority (%s)", exc.strerror)


def describe(tid: int) -> str:
    """A thread's scheduling policy by name (for tests and diagnostics)."""
    policy = os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK
    return {os.SCHED_OTHER: "other", os.SCHED_FIFO: "fifo", os.SCHED_RR: "rr",
            os.SCHED_BATCH: "batch", os.SCHED_IDLE: "idle"}.get(policy, str(policy))
