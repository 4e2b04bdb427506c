"""How a run is asked to end: the signals, the grace, the timers that decide, the record.

Every stop (a call, a kill, a timer) goes through `ask`: the first reason
asked sticks, a paused run is thawed (`msbd.daemon.freezer`), the worker
gets SIGTERM (it asks its guest to stop over the control channel: the
guest's init SIGTERMs its processes, SIGKILLs what is left after the grace
and reports the exit code) and a KILL_GRACE deadline is
set after the grace and `KILL_MARGIN`; when that falls, the worker's whole
process group gets SIGKILL. Signals go out at once, with no await, so a burst of a
thousand due deadlines is a thousand signals in a row; the `stopping` record
follows separately (`record`), and failing to write it changes nothing: the
reason is in memory and the end is what gets recorded.

Signals reach the worker through its pidfd (a reused pid can never be hit),
sent from the loop itself: at a real-time priority (`msbd.daemon.priority`)
a thousand take it about 30 ms, and no thread hand-off (a GIL round trip each,
measured slower than the signal) stands in between. The process group is killed by
its id, which is safe only while the worker is unreaped: until then neither
its pid nor its group id can be given to another process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal as signal_mod
import time
from collections.abc import Callable

import anyio

from msbd.config import Settings
from msbd.daemon import cgroups
from msbd.daemon.freezer import Freezer
from msbd.daemon.live import Live
from msbd.daemon.timers import (
    Scheduler,
    TimerKind,
    grace_deadline,
    heartbeat_deadline,
    idle_deadline,
)
from msbd.db.store import Store
from msbd.errors import Conflict, StoreError
from msbd.log import ctx
from msbd.model import Reason, State

log = logging.getLogger("msbd.supervisor")

GUEST_MARGIN = 5.0
"""What a guest's init gets after its own grace to SIGKILL what is left, sync and
report its exit code (the worker's `shutdown_margin`)."""
KILL_MARGIN = GUEST_MARGIN + 2.0
"""The daemon's SIGKILL comes this long after a stop's grace: after the guest's own
end and the worker's forced exit, never before them (a guest's exit code would be lost)."""

NON_FATAL_SIGNALS = frozenset({signal_mod.SIGSTOP, signal_mod.SIGCONT, signal_mod.SIGTSTP,
                               signal_mod.SIGTTIN, signal_mod.SIGTTOU, signal_mod.SIGWINCH,
                               signal_mod.SIGURG, signal_mod.SIGCHLD})
"""Signals after which a sandbox is expected to go on running: `sandbox.kill` with one
of them passes it on and counts as activity, it does not stop the run."""


_RECORDS_STOPPING = frozenset({State.STARTING, State.RUNNING, State.PAUSED})


class Stopping:
    """The stop and signal policy, over the shared timers; owns no run."""

    def __init__(self, *, settings: Settings, store: Store, timers: Scheduler,
                 freezer: Freezer, urgent: Callable[[], None] = lambda: None) -> None:
        self._settings = settings
        self._urgent = urgent  # before a signal: the woken worker must not preempt the loop
        self._freezer = freezer
        self._store = store
        self._timers = timers

    def ask(self, live: Live, reason: Reason, *, grace: float, detail: str | None = None,
            sig: int = signal_mod.SIGTERM) -> bool:
        """The signal, at once (no await): SIGTERM and a KILL_GRACE deadline, or SIGKILL.

        Returns whether a `stopping` record is due (`record`).
        """
        if live.exited.is_set():
            return False
        self._freezer.thaw_for_stop(live)  # a frozen worker cannot act on SIGTERM
        if live.requested is None:
            live.requested = reason
            live.stop_detail = detail
        if grace <= 0 or sig == signal_mod.SIGKILL:
            self.kill_group(live)
        else:
            self.signal(live, sig)
            deadline = grace_deadline(self._timers.now(), grace, margin=KILL_MARGIN)
            current = self._timers.get(live.ref.id, TimerKind.KILL_GRACE)
            if current is None or deadline < current:
                self._timers.set(live.ref.id, TimerKind.KILL_GRACE, deadline)
        # A start that timed out goes straight to `failed`, not through `stopping`.
        return reason is not Reason.LAUNCH_FAILED

    async def record(self, live: Live, reason: Reason) -> None:
        """Record `stopping`, unless the run is past it; a refused write is only logged."""
        async with live.lock:
            if live.exited.is_set() or live.state not in _RECORDS_STOPPING:
                return
            with anyio.CancelScope(shield=True):
                try:
                    await self._store.transition(
                        live.ref, State.STOPPING, now=time.time(), detail=str(reason))
                except Conflict:
                    return  # it ended meanwhile; the watcher records the end
                except StoreError as exc:
                    # The worker has its signal; the end is what gets recorded.
                    log.warning("cannot record stopping: %s", exc, extra=ctx(sandbox=live.name))
                    return
            live.state = State.STOPPING
            log.info("stopping", extra=ctx(sandbox=live.name, reason=reason))

    async def request(self, live: Live, reason: Reason, *, grace: float,
                      detail: str | None = None, sig: int = signal_mod.SIGTERM) -> None:
        """`ask`, then `record` when due."""
        if self.ask(live, reason, grace=grace, detail=detail, sig=sig):
            await self.record(live, reason)

    def signal(self, live: Live, sig: int) -> None:
        """Send `sig` to the worker through its pidfd (no await)."""
        if live.reaped:
            return
        self._urgent()
        with contextlib.suppress(ProcessLookupError):
            signal_mod.pidfd_send_signal(live.worker.pidfd, sig)

    def kill_group(self, live: Live) -> None:
        """SIGKILL the worker's process group (its session): the worker and all it forked;
        and with cgroups, everything in the run's cgroup (`cgroup.kill`)."""
        self._urgent()
        if live.cgroup is not None:
            cgroups.kill(live.cgroup)
        if live.reaped:
            return
        try:
            os.killpg(live.pid, signal_mod.SIGKILL)
        except ProcessLookupError:
            self.signal(live, signal_mod.SIGKILL)

    # --- the timers' part ---------------------------------------------------------

    def arm_idle(self, live: Live) -> None:
        deadline = idle_deadline(live.last_activity, live.spec.idle_timeout)
        if deadline is not None:
            self._timers.set(live.ref.id, TimerKind.IDLE, deadline)

    def due(self, live: Live, kind: TimerKind, now: float) -> Reason | None:
        """The reason `kind` ends `live` now, or None (re-armed, or the grace SIGKILL sent)."""
        key = live.ref.id
        if live.paused_at is not None and kind in (TimerKind.IDLE, TimerKind.HEARTBEAT):
            return None  # frozen: no beats, no idleness (resume sets both afresh)
        match kind:
            case TimerKind.IDLE:
                deadline = idle_deadline(live.last_activity, live.spec.idle_timeout)
                assert deadline is not None
                if deadline > now:  # there was activity: look again then
                    self._timers.set(key, kind, deadline)
                    return None
                return Reason.IDLE_TIMEOUT
            case TimerKind.MAX_DURATION:
                return Reason.MAX_DURATION
            case TimerKind.HEARTBEAT:
                s = self._settings
                deadline = heartbeat_deadline(live.last_beat, s.heartbeat_interval,
                                              s.heartbeat_misses)
                if deadline > now:
                    self._timers.set(key, kind, deadline)
                    return None
                return Reason.HEARTBEAT_LOST
            case TimerKind.KILL_GRACE:
                log.warning("grace over, killing the worker", extra=ctx(sandbox=live.name))
                self.kill_group(live)
                return None

    def timer_detail(self, live: Live, reason: Reason) -> str:
        if reason is Reason.IDLE_TIMEOUT:
            return f"idle for {live.spec.idle_timeout:g}s"
        if reason is Reason.MAX_DURATION:
            return f"ran for {live.spec.max_duration:g}s"
        return f"no heartbeat for {self._timers.now() - live.last_beat:.1f}s"
