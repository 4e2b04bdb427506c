"""Pause and resume: a run's cgroup frozen in place, and the timers that must not notice.

Why it is built this way
------------------------
A paused sandbox is a frozen cgroup (`cgroup.freeze`, cgroup v2): the VMM,
its vCPU threads and everything the run started stop where they are and
keep their memory; the guest cannot tell. msbd never SIGSTOPs a worker
instead: any process allowed to signal it could SIGCONT it, and a signal to
the worker's process group misses what the workload moved out of it. So
there is no pause without cgroups (`NotSupported`, with the reason they are
off).

The kernel freezes asynchronously. `paused` is recorded (one transaction,
one event) only once `cgroup.events` says `frozen 1`, and `running` again
only once it says `frozen 0`; the wait is woken by the file's change
notification (`EPOLLPRI`), never by polling, and gives up after the
setting `freeze_timeout` with the run thawed and running as before. A VMM
freezes in milliseconds on a real machine; under nested TCG a guest's
cgroup was once measured to take about 34 s, hence a setting.

The kernel never freezes a kernel thread, so a cgroup that holds one is
never reported frozen. KVM puts a kernel thread of its own
(`kvm-nx-lpage-recovery-<pid>`) into the VMM's cgroup on some kernels
(seen on Debian 12's 6.1); newer ones run it as a user worker, which
freezes. So a pause first moves any kernel thread out of the run's cgroup
into the leaf `kernel-threads/` beside `runs/` (that thread's little CPU
time is no longer the run's; it ends with the VM as before), and answers
`NotSupported` naming a thread the kernel would not let go, rather than
waiting out `freeze_timeout` for a freeze that cannot happen. The run's
`Live.lock` serialises pause, resume and the `stopping` record.

Timers: a frozen worker sends no heartbeats, so the heartbeat deadline is
dropped for the pause and set afresh at resume (the whole budget again).
The idle deadline is dropped too and at resume placed as far after the
resume as it was after the freeze began: idle time before the pause counts,
paused time does not (a `touch` while paused counts as activity at resume).
`max_duration` is left alone: it keeps counting while paused.
`Stopping.due` ignores an idle or heartbeat deadline of a paused run.

A stop, a kill or a timer of a paused run calls `thaw_for_stop` before any
signal (`Stopping.ask`): a frozen worker cannot act on SIGTERM and ask its
guest to shut down. A pause still waiting for its freeze is told to give
up. SIGKILL and `cgroup.kill` reach frozen processes, so a run can also end
while frozen (`paused -> stopped`).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from pathlib import Path
from typing import Final

import anyio

from msbd import states
from msbd.config import Settings
from msbd.daemon import cgroups
from msbd.daemon.cgroups import Cgroups
from msbd.daemon.live import Live
from msbd.daemon.timers import Scheduler, TimerKind, heartbeat_deadline, idle_deadline
from msbd.db.store import Store
from msbd.errors import Conflict, MsbdError, NotSupported, StoreError, TimedOut
from msbd.model import SandboxInfo, SandboxRef, State


class Freezer:
    """Pause and resume of live runs; owns no run, only the pauses in progress."""

    def __init__(self, *, settings: Settings, store: Store, timers: Scheduler,
                 cgroups: Cgroups) -> None:
        self._settings = settings
        self._store = store
        self._timers = timers
        self._cgroups = cgroups
        # sandbox id -> set when a stop interrupts the pause waiting for its freeze.
        self._pausing: dict[int, anyio.Event] = {}

    async def pause(self, ref: SandboxRef, live: Live | None) -> SandboxInfo:
        """Freeze `live`'s run, then record `paused`."""
        if self._cgroups.reason is not None:
            raise NotSupported(
                f"cannot pause sandbox {ref.name!r}: pause freezes the run's cgroup, and "
                f"cgroups are off: {self._cgroups.reason}",
                data={"sandbox": ref.name, "cgroups": self._cgroups.reason})
        if live is None:
            raise await self._refusal(ref, "paused", None)
        async with live.lock:
            if (live.exited.is_set() or live.requested is not None
                    or live.state not in states.pausable or live.cgroup is None):
                raise await self._refusal(ref, "paused", live)
            if stuck := self._set_aside(_kernel_threads(live.cgroup)):
                raise NotSupported(
                    f"cannot pause sandbox {ref.name!r}: its cgroup holds kernel threads "
                    f"({', '.join(stuck)}) that could not be moved out, and the cgroup v2 "
                    "freezer never freezes a kernel thread, so the cgroup would never be "
                    "frozen", data={"sandbox": ref.name, "kernel_threads": stuck})
            live.paused_at = self._timers.now()
            self._timers.cancel(ref.id, TimerKind.IDLE)
            self._timers.cancel(ref.id, TimerKind.HEARTBEAT)
            interrupt = self._pausing[ref.id] = anyio.Event()
            recorded = False
            try:
                reached = await self._settle(live, live.cgroup, True, interrupt)
                if not reached:
                    raise TimedOut(f"sandbox {ref.name!r} did not freeze within "
                                   f"{self._settings.freeze_timeout:g}s (freeze_timeout); "
                                   "it was thawed and runs on", data={"sandbox": ref.name})
                with anyio.CancelScope(shield=True):
                    info, _ = await self._store.transition(ref, State.PAUSED, now=time.time())
                live.state = State.PAUSED
                recorded = True
                return info
            finally:
                del self._pausing[ref.id]
                if not recorded:
                    self._undo(live)

    async def resume(self, ref: SandboxRef, live: Live | None) -> SandboxInfo:
        """Thaw `live`'s run, then record `running`; its idle and heartbeat timers go on."""
        if live is None:
            raise await self._refusal(ref, "resumed", None)
        async with live.lock:
            if (live.exited.is_set() or live.requested is not None
                    or live.state not in states.resumable or live.cgroup is None):
                raise await self._refusal(ref, "resumed", live)
            if not await self._settle(live, live.cgroup, False, anyio.Event()):
                raise TimedOut(f"sandbox {ref.name!r} did not thaw within "
                               f"{self._settings.freeze_timeout:g}s (freeze_timeout)",
                               data={"sandbox": ref.name})
            try:
                with anyio.CancelScope(shield=True):
                    info, _ = await self._store.transition(ref, State.RUNNING, now=time.time())
            except StoreError:
                with contextlib.suppress(OSError):  # as recorded: paused
                    cgroups.freeze(live.cgroup, True)
                raise
            live.state = State.RUNNING
            self._thawed(live)
            return info

    def thaw_for_stop(self, live: Live) -> None:
        """Before a stop's signal (no await): thaw a paused or pausing run."""
        if live.paused_at is None or live.cgroup is None:
            return
        with contextlib.suppress(OSError):  # gone: the run ended, and SIGKILL needs no thaw
            cgroups.freeze(live.cgroup, False)
        interrupt = self._pausing.get(live.ref.id)
        if interrupt is not None:
            interrupt.set()

    # --- internals ---------------------------------------------------------------------

    def _set_aside(self, kthreads: list[tuple[int, str]]) -> list[str]:
        """Move kernel threads out of a run's cgroup into `kernel-threads/` beside `runs/`;
        the names of those the kernel would not let go."""
        assert self._cgroups.root is not None
        aside, stuck = self._cgroups.root / KERNEL_THREADS, []
        for pid, name in kthreads:
            try:
                aside.mkdir(exist_ok=True)
                cgroups.place(aside, pid)
            except ProcessLookupError:
                pass  # gone meanwhile
            except OSError as exc:
                stuck.append(f"{name} ({pid}): {exc.strerror}")
        return stuck

    async def _settle(self, live: Live, path: Path, frozen: bool,
                      interrupt: anyio.Event) -> bool:
        """Write `cgroup.freeze` and wait until `cgroup.events` agrees: True when it does,
        False after `freeze_timeout`; `Conflict` if the run ended or a stop came first."""
        ref = live.ref
        done, failure = False, None
        try:
            cgroups.freeze(path, frozen)
        except OSError as exc:
            failure = exc
        if failure is None:
            with anyio.move_on_after(self._settings.freeze_timeout):
                async with anyio.create_task_group() as tg:
                    async def reached() -> None:
                        nonlocal done, failure
                        try:
                            await _freezer_state(path, frozen)
                            done = True
                        except OSError as exc:  # the cgroup went away: the run ended
                            failure = exc
                        tg.cancel_scope.cancel()

                    async def cut_short(event: anyio.Event) -> None:
                        await event.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(reached)
                    tg.start_soon(cut_short, live.exited)
                    tg.start_soon(cut_short, interrupt)
        if live.exited.is_set() or interrupt.is_set():
            raise Conflict(f"sandbox {ref.name!r} ended or was stopped meanwhile",
                           data={"sandbox": ref.name})
        if failure is not None:
            raise MsbdError(f"sandbox {ref.name!r}: cannot use {path}/cgroup.freeze: "
                            f"{failure.strerror or failure}", data={"sandbox": ref.name})
        return done

    def _undo(self, live: Live) -> None:
        """A pause that was not recorded: thawed again, timers as if nothing happened."""
        if live.requested is not None or live.exited.is_set():
            live.paused_at = None  # a stop took over: it thawed the run, it owns the timers
            return
        assert live.cgroup is not None
        with contextlib.suppress(OSError):
            cgroups.freeze(live.cgroup, False)
        self._thawed(live)

    def _thawed(self, live: Live) -> None:
        """The run is thawed: the heartbeat budget starts afresh; idle time goes on from
        where the freeze began (activity meanwhile, a `touch`, counts as now)."""
        assert live.paused_at is not None
        now = self._timers.now()
        idle_so_far = max(0.0, live.paused_at - live.last_activity)
        live.last_activity = now - idle_so_far
        live.last_beat = now
        live.paused_at = None
        s, key = self._settings, live.ref.id
        self._timers.set(key, TimerKind.HEARTBEAT,
                         heartbeat_deadline(now, s.heartbeat_interval, s.heartbeat_misses))
        deadline = idle_deadline(live.last_activity, live.spec.idle_timeout)
        if deadline is not None:
            self._timers.set(key, TimerKind.IDLE, deadline)

    async def _refusal(self, ref: SandboxRef, verb: str, live: Live | None) -> Conflict:
        """`Conflict` naming the state the sandbox is in, for a pause or resume refused."""
        if live is not None and not live.exited.is_set():
            state = "stopping" if live.requested is not None else str(live.state)
        else:
            state = str((await self._store.get(ref)).state)
        want = "running" if verb == "paused" else "paused"
        return Conflict(f"sandbox {ref.name!r} is {state}; only a {want} sandbox can be {verb}",
                        data={"sandbox": ref.name, "state": state})


_PF_KTHREAD: Final = 0x00200000
KERNEL_THREADS: Final = "kernel-threads"
"""The leaf, beside `runs/`, that kernel threads taken out of a run's cgroup go to."""


def _kernel_threads(path: Path) -> list[tuple[int, str]]:
    """(pid, name) of every kernel thread in the cgroup `path` (flags in /proc/PID/stat)."""
    found = []
    for pid in (path / "cgroup.procs").read_text().split():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if int(rest.split()[6]) & _PF_KTHREAD:
            found.append((int(pid), comm))
    return found


async def _freezer_state(path: Path, frozen: bool) -> None:
    """Return once `path`'s `cgroup.events` says `frozen 1` (or `frozen 0`).

    kernfs flags a changed file with EPOLLPRI until it is read again through the same
    open file, so each read re-arms the wait: no event is lost, nothing is polled.
    """
    want = f"frozen {int(frozen)}"
    fd = os.open(path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    watch = select.epoll()
    try:
        watch.register(fd, select.EPOLLPRI)
        while True:
            os.lseek(fd, 0, os.SEEK_SET)
            if want in os.read(fd, 4096).decode("ascii", "replace").splitlines():
                return
            await anyio.wait_readable(watch.fileno())
            watch.poll(0)
    finally:
        watch.close()
        os.close(fd)
