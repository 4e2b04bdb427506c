"""The event loop's thread runs at the lowest real-time priority, when the host allows it.

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

What
----
`SCHED_FIFO` priority 1, the lowest, for the calling thread only (Linux
scheduling policies are per thread), with `SCHED_RESET_ON_FORK`: every
thread and process created after it starts as `SCHED_OTHER`, so the
workers and so the guests run at normal priority. The daemon applies it to
two threads: the loop's, and the database thread's, which the loop waits on
(its commits, and the GIL whenever that thread holds it: at normal priority
a preempted database thread would hold the loop up in turn). Both spend
their time blocked (epoll, the database's queue) and do no long work; should
one ever spin, the kernel's real-time throttling (`sched_rt_runtime_us`, 95%
of each second by default) still leaves every CPU to other tasks.

When the host refuses (no CAP_SYS_NICE, RLIMIT_RTPRIO 0, systemd's
`RestrictRealtime=`, a cgroup without a real-time budget), the loop runs at
normal priority and the daemon says why, once. `realtime_loop = false`
turns it off (and puts a loop that a service manager made real-time back to
normal priority).
"""

from __future__ import annotations

import os
from typing import Final

REALTIME_POLICIES: Final = frozenset({os.SCHED_FIFO, os.SCHED_RR})
LOOP_PRIORITY: Final = 1


def apply(enabled: bool) -> str:
    """Set the calling thread's policy as the setting says; what it runs at, for the log."""
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


def describe(tid: int) -> str:
    """A thread's scheduling policy by name (for tests and diagnostics)."""
    policy = os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK
    return {os.SCHED_OTHER: "other", os.SCHED_FIFO: "fifo", os.SCHED_RR: "rr",
            os.SCHED_BATCH: "batch", os.SCHED_IDLE: "idle"}.get(policy, str(policy))
