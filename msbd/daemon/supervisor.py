"""Launch workers, watch them until they end, stop them; every end gets one recorded reason.

How it works
------------
Every live run is a `Live` (`msbd.daemon.live`), keyed by the sandbox's
immutable id, never by its name: a call that read sandbox `x` and then
waited acts on that very record or on nothing.

`start` takes the sandbox's share of the limits (`msbd.daemon.limits`,
synchronously, so two starts cannot both pass the check), then in one
transaction opens a new run and moves the record to `starting`, reading the
record in that same transaction: the worker is launched with exactly what
the transaction saw, as the owner recorded with it. It spawns the worker
with the fd map of `msbd.vm` (or hands the spec to a warm worker of
`msbd.daemon.pool`) and hands it to a watcher task
(`msbd.daemon.watcher`) owned by the supervisor's task group, which follows
it to its recorded end. Stops of every kind, and what the timers decide,
go through `msbd.daemon.stopping`, pause and resume through `freezer`
(`msbd.daemon.freezer`). A run whose end the database refused
stays in memory until it lands (`overlay` shows it to readers), and holds
nothing of the limits meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal as signal_mod
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from msbd import states
from msbd.config import Settings
from msbd.daemon import procfs
from msbd.daemon.access import vm_identity
from msbd.daemon.cgroups import Cgroups
from msbd.daemon.cgroups import off as cgroup_off
from msbd.daemon.cgroups import release as release_cgroup
from msbd.daemon.cgroups import usage as cgroup_usage
from msbd.daemon.console import ConsoleLog, LogChunk, log_path, read_following
from msbd.daemon.doctor import HostCheck
from msbd.daemon.freezer import Freezer
from msbd.daemon.limits import Limits, Usage, share_of
from msbd.daemon.live import Live, overlay
from msbd.daemon.netpolicy import with_network
from msbd.daemon.pool import WorkerPool
from msbd.daemon.priority import LoopPriority
from msbd.daemon.runlimits import open_run_cgroup, run_limits
from msbd.daemon.stopping import GUEST_MARGIN, NON_FATAL_SIGNALS, Stopping
from msbd.daemon.timers import AfterFires, Lateness, Scheduler, TimerKind, max_duration_deadline
from msbd.daemon.watcher import Watcher
from msbd.db.store import RunEnd, Store
from msbd.errors import Conflict, LaunchFailed, StoreError, TimedOut
from msbd.log import ctx
from msbd.model import LaunchSpec, Reason, SandboxInfo, SandboxRef, State, WorkerSpec
from msbd.rpc.methods import CgroupUsage

log = logging.getLogger("msbd.supervisor")

_ENCODER = msgspec.json.Encoder()
# How long a call that waits for a run's end waits for a refused write to land.
_RECORD_WAIT = 30.0


class Supervisor:
    def __init__(self, *, settings: Settings, store: Store, scheduler: Scheduler,
                 task_group: anyio.abc.TaskGroup, host: HostCheck,
                 pool: WorkerPool | None = None,
                 cgroups: Cgroups | None = None,
                 loop_priority: LoopPriority | None = None) -> None:
        self._settings = settings
        self.loop_priority = loop_priority if loop_priority is not None else LoopPriority(False)
        self.cgroups = cgroups if cgroups is not None else cgroup_off("not set up")
        self._pool = pool if pool is not None else WorkerPool(settings)  # unserved: no pool
        self._store = store
        self._timers = scheduler
        self._tg = task_group
        self._host = host
        self._daemon_uid = os.getuid()
        self.log_dir = Path(settings.state_dir) / "logs"
        self.live: dict[int, Live] = {}
        self._limits = Limits(settings, admins=frozenset({0, self._daemon_uid}))
        # sandbox id -> set once a launch in progress has a live worker (or failed).
        self._launching: dict[int, anyio.Event] = {}
        self._after_fires = AfterFires(scheduler, task_group)  # the timers' stop records
        self._changed = anyio.Event()
        self._give_up = anyio.Event()  # shutdown: stop retrying refused writes
        self.freezer = Freezer(settings=settings, store=store, timers=scheduler,
                               cgroups=self.cgroups)  # pause and resume
        urgent = self.loop_priority.urgent
        self._stopping = Stopping(settings=settings, store=store, timers=scheduler,
                                  freezer=self.freezer, urgent=urgent)
        self._watcher = Watcher(settings=settings, store=store, timers=scheduler,
                                stopping=self._stopping, on_exit=self._exited,
                                on_ended=self._ended, give_up=self._give_up, urgent=urgent)

    def _exited(self, live: Live) -> None:
        """The worker is gone: what it held is free, whether its end is on disk or not."""
        self._limits.release(live.ref.id)
        if live.cgroup is not None:
            self._tg.start_soon(release_cgroup, live.cgroup)

    def _ended(self, live: Live) -> None:
        self.live.pop(live.ref.id, None)
        self._notify_change()

    def _notify_change(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self) -> None:
        """Returns when the set of live sandboxes changed."""
        await self._changed.wait()

    # --- libkrun -----------------------------------------------------------------

    def libkrun_path(self) -> str | None:
        """The library workers load: the setting, else what the host check found."""
        return self._settings.libkrun or self._host.report.libkrun

    def missing_libkrun(self) -> str:
        problem = self._host.report.libkrun_problem or "libkrun.so.1 was not found"
        return (f"no libkrun: {problem}. Install libkrun (libkrun.so.1) or point "
                "--libkrun / MSBD_LIBKRUN at it")

    def check_can_launch(self) -> str:
        """The libkrun path to launch with, or `LaunchFailed` saying what is missing."""
        path = self.libkrun_path()
        if path is None:
            raise LaunchFailed(f"cannot launch: {self.missing_libkrun()}",
                               data={"missing": "libkrun"})
        return path

    # --- limits ------------------------------------------------------------

    def usage(self, owner_uid: int | None = None) -> Usage:
        """(sandboxes, vcpus, memory MiB) held by starting and live sandboxes."""
        return self._limits.usage(owner_uid)

    def check_fits(self, spec: LaunchSpec, *, owner_uid: int, name: str) -> None:
        """`LimitReached` if starting a sandbox of `spec` now would pass a limit, `Conflict`
        if a host port it publishes is held by a running sandbox."""
        self._limits.check(share_of(spec, owner_uid, name), name=name)

    def busy(self, ref: SandboxRef) -> bool:
        """Whether `ref` has a launch, a worker, or an unrecorded end."""
        return self._limits.holds(ref.id) or ref.id in self.live

    # --- start ------------------------------------------------------------------

    async def start(self, info: SandboxInfo, *, timeout: float | None) -> SandboxInfo:
        """Start `info`'s sandbox; answers once the worker entered libkrun."""
        ref = info.ref
        libkrun = self.check_can_launch()
        if self.busy(ref):
            raise Conflict(f"sandbox {ref.name!r} is {self._live_state(ref)}",
                           data={"sandbox": ref.name})
        if info.state not in states.startable:
            raise Conflict(f"sandbox {ref.name!r} is {info.state}",
                           data={"sandbox": ref.name, "state": info.state})
        assert info.spec is not None
        self._limits.reserve(ref.id, share_of(info.spec, info.owner_uid, ref.name),
                             name=ref.name)
        launched = self._launching[ref.id] = anyio.Event()
        try:
            with anyio.CancelScope(shield=True):
                live = await self._launch(ref, libkrun)
        except BaseException:
            self._limits.release(ref.id)
            self._pool.refill()
            raise
        finally:
            del self._launching[ref.id]
            launched.set()
        try:
            return await self._answer(live, timeout)
        finally:
            self._pool.refill()  # only now: a starting interpreter would slow the launch

    async def _answer(self, live: Live, timeout: float | None) -> SandboxInfo:
        """The record once `live` entered libkrun; `LaunchFailed` if it never did."""
        ref = live.ref
        timeout = self._settings.start_timeout if timeout is None else timeout
        with anyio.move_on_after(timeout):
            await _first(live.running.wait, live.exited.wait)
        if live.running.is_set():
            return await self._store.get(ref)
        if not live.exited.is_set():
            await self._stopping.request(live, Reason.LAUNCH_FAILED, grace=0.0,
                                     detail=f"the worker did not enter libkrun within "
                                            f"{timeout:g}s")
        final = await self._final(live)
        run = final.run
        if run is not None and run.reason is Reason.STOP_REQUESTED:
            raise Conflict(f"sandbox {ref.name!r} was stopped while starting",
                           data={"sandbox": ref.name})
        detail = (run.detail if run is not None else None) or "the worker ended before libkrun"
        raise LaunchFailed(f"sandbox {ref.name!r} failed to launch: {detail}",
                           data={"sandbox": ref.name,
                                 "reason": str(run.reason) if run and run.reason else None,
                                 "exit_code": run.exit_code if run else None})

    async def _launch(self, ref: SandboxRef, libkrun: str) -> Live:
        """Record the new run, spawn its worker, hand it to a watcher (shielded by the caller)."""
        record, owner = await self._store.begin_run(ref, now=time.time())
        assert record.run is not None and record.spec is not None
        spec, run_id = record.spec, record.run.id
        # A record from before networks were chosen gets the default now.
        decided = with_network(spec, self._settings)
        fields = {f: getattr(decided, f) for f in decided.__struct_fields__}
        uid, gid, groups = vm_identity(owner, self._daemon_uid)
        worker_spec = WorkerSpec(**fields, heartbeat_interval=self._settings.heartbeat_interval,
                                 shutdown_grace=self._settings.stop_timeout,
                                 shutdown_margin=GUEST_MARGIN, libkrun=libkrun,
                                 uid=uid, gid=gid, groups=groups)
        try:
            console = ConsoleLog(log_path(self.log_dir, ref.id),
                                 max_bytes=self._settings.log_max_bytes)
        except OSError as exc:
            message = f"cannot open the console log: {exc.strerror}"
            await self._end_unspawned(ref, message)
            raise LaunchFailed(f"sandbox {ref.name!r} failed to launch: {message}",
                               data={"sandbox": ref.name}) from exc
        cgroup = None
        try:  # a warm worker from the pool gets the spec now, else one is spawned with it
            cgroup = open_run_cgroup(self.cgroups, run_id, run_limits(spec, self._settings))
            worker = await self._pool.launch(_ENCODER.encode(worker_spec), cgroup=cgroup)
        except LaunchFailed as exc:
            console.close()
            if cgroup is not None:
                self._tg.start_soon(release_cgroup, cgroup)
            await self._end_unspawned(ref, exc.message)
            raise LaunchFailed(f"sandbox {ref.name!r} failed to launch: {exc.message}",
                               data={"sandbox": ref.name}) from exc
        now = self._timers.now()
        live = Live(ref=ref, owner_uid=record.owner_uid, spec=spec, run_id=run_id,
                    worker=worker, console=console, started=now, last_activity=now,
                    last_beat=now, cgroup=cgroup)
        self.live[ref.id] = live
        self._notify_change()
        log.info("worker spawned", extra=ctx(sandbox=ref.name, pid=worker.pid, run=run_id))
        self._tg.start_soon(self._watcher.watch, live)
        if (deadline := max_duration_deadline(now, spec.max_duration)) is not None:
            self._timers.set(ref.id, TimerKind.MAX_DURATION, deadline)
        with contextlib.suppress(StoreError):  # the end, when it comes, is what matters
            await self._store.set_run_process(ref, run_id, pid=worker.pid,
                                              proc_start=procfs.start_ticks(worker.pid),
                                              boot_id=procfs.boot_id())
        return live

    async def _end_unspawned(self, ref: SandboxRef, detail: str) -> None:
        await self._store.transition(ref, State.FAILED, now=time.time(),
                                     end=RunEnd(reason=Reason.LAUNCH_FAILED, detail=detail))

    def _live_state(self, ref: SandboxRef) -> str:
        live = self.live.get(ref.id)
        return live.describe() if live is not None else "starting"

    async def _final(self, live: Live) -> SandboxInfo:
        """The run's end as recorded; `StoreError` if it still is not on disk a while later."""
        await live.exited.wait()
        with anyio.move_on_after(_RECORD_WAIT):
            await live.ended.wait()
        if live.final is not None:
            return live.final
        if not live.ended.is_set():
            raise StoreError(f"sandbox {live.name!r} ended, but the database refused to record "
                             f"it ({live.write_error}); msbd keeps retrying",
                             data={"sandbox": live.name})
        return await self._store.get(live.ref)

    # --- stopping -------------------------------------------------------------------

    async def stop(self, ref: SandboxRef, *, timeout: float,
                   reason: Reason = Reason.STOP_REQUESTED,
                   detail: str | None = None) -> SandboxInfo:
        live = await self._current(ref)
        if live is None:
            return await self._store.get(ref)
        await self._stopping.request(live, reason, grace=timeout, detail=detail)
        return await self._final(live)

    async def kill(self, ref: SandboxRef, sig: int) -> SandboxInfo:
        live = await self._current(ref)
        if live is None or live.exited.is_set():
            raise Conflict(f"sandbox {ref.name!r} is not running", data={"sandbox": ref.name})
        if sig in NON_FATAL_SIGNALS:
            live.last_activity = self._timers.now()
            self._stopping.signal(live, sig)
            return await self._store.get(ref)
        await self._stopping.request(live, Reason.KILLED, grace=self._settings.stop_timeout,
                                     sig=sig)
        if sig == signal_mod.SIGKILL:
            return await self._final(live)
        return await self._store.get(ref)

    async def wait(self, ref: SandboxRef, *, timeout: float | None) -> SandboxInfo:
        live = await self._current(ref)
        if live is None:
            return await self._store.get(ref)
        with anyio.move_on_after(timeout if timeout is not None else float("inf")):
            await live.exited.wait()
        if not live.exited.is_set():
            raise TimedOut(f"sandbox {ref.name!r} still running after {timeout:g}s",
                           data={"sandbox": ref.name})
        return await self._final(live)

    def touch(self, ref: SandboxRef) -> None:
        live = self.live.get(ref.id)
        if live is None or live.exited.is_set():
            raise Conflict(f"sandbox {ref.name!r} is not running", data={"sandbox": ref.name})
        live.last_activity = self._timers.now()

    async def _current(self, ref: SandboxRef) -> Live | None:
        """The live worker of `ref`, waiting out a launch in progress."""
        launching = self._launching.get(ref.id)
        if launching is not None:
            await launching.wait()
        return self.live.get(ref.id)

    def overlay(self, info: SandboxInfo) -> SandboxInfo:
        """`info` as it really is: a run that ended but is not recorded yet shows its end."""
        live = self.live.get(info.id)
        return info if live is None else overlay(live, info)

    async def shutdown(self, *, grace: float) -> None:
        """Stop every live sandbox (daemon exit): SIGTERM, SIGKILL after `grace`."""
        lives = list(self.live.values())
        if lives:
            log.info("stopping %d sandboxes", len(lives))
        with anyio.move_on_after(grace + _RECORD_WAIT):
            async with anyio.create_task_group() as tg:
                for live in lives:
                    tg.start_soon(self._stop_quietly, live.ref, grace)
        self._give_up.set()
        with anyio.move_on_after(_RECORD_WAIT):
            for live in list(self.live.values()):
                await live.ended.wait()

    async def _stop_quietly(self, ref: SandboxRef, grace: float) -> None:
        with contextlib.suppress(StoreError):
            await self.stop(ref, timeout=grace, detail="daemon shutting down")

    # --- timers ---------------------------------------------------------------------

    def fire(self, key: int, kind: TimerKind) -> None:
        """Scheduler callback, for one due deadline. Decides and signals right here
        (no await, so a thousand due deadlines are a thousand signals in a row);
        only the database record is left for after the burst (`AfterFires`)."""
        live = self.live.get(key)
        if live is None or live.exited.is_set():
            return
        reason = self._stopping.due(live, kind, self._timers.now())
        if reason is None:
            return
        if self._stopping.ask(live, reason, grace=self._settings.stop_timeout,
                              detail=self._stopping.timer_detail(live, reason)):
            self._after_fires.add(self._stopping.record, live, reason)

    def timer_lateness(self) -> Lateness:
        """How late deadlines fired (seconds), over the scheduler's recent samples."""
        return self._timers.lateness()

    # --- observing --------------------------------------------------------------------

    async def logs(self, ref: SandboxRef, *, offset: int | None, tail: int | None, limit: int,
                   wait: float | None) -> LogChunk:
        live = self.live.get(ref.id)
        output = live.output if live is not None and not live.exited.is_set() else None
        return await read_following(log_path(self.log_dir, ref.id), offset=offset, tail=tail,
                                    limit=limit, wait=wait, output=output)

    def metrics(self, ref: SandboxRef) -> tuple[int, procfs.Usage, CgroupUsage | None]:
        """(pid, usage, cgroup usage or None without cgroups) of the running worker. Read
        only while the worker is unreaped, on the event loop that alone reaps it: the pid
        cannot belong to anyone else, and the run's cgroup is still there."""
        live = self.live.get(ref.id)
        usage = None
        if live is not None and not live.reaped:
            usage = procfs.usage(live.pid)
        if live is None or usage is None:
            raise Conflict(f"sandbox {ref.name!r} is not running", data={"sandbox": ref.name})
        return live.pid, usage, None if live.cgroup is None else cgroup_usage(live.cgroup)


async def _first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of `waits` returns."""
    async with anyio.create_task_group() as tg:
        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            tg.cancel_scope.cancel()
        for wait in waits:
            tg.start_soon(one, wait)
