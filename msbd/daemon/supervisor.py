"""Launch workers, watch them until they end, stop them; every end gets one recorded reason.

How it works
------------
Every live run is a `Live` (see `msbd.daemon.live`), keyed by the sandbox's
immutable id, never by its name: a call that read sandbox `x` and then
waited acts on that very record or on nothing.

`start` takes the sandbox's share of the limits (synchronously, so two
starts cannot both pass the check), then in one transaction opens a new run
and moves the record to `starting`, reading the record in that same
transaction: the worker is launched with exactly what the transaction saw.
It spawns the worker with the fd map of `msbd.vm`, records its pid with its
process start time and boot id, and hands it to a watcher task owned by the
supervisor's task group. The watcher reads the status pipe (`entering` ->
`running`, `heartbeat`, `error ...`), copies the console pipe into the
sandbox's log, and waits on the worker's pidfd. When the worker is gone it
reaps it, gives back what the run held, decides the reason (a reason the
daemon requested wins) and records the end, retrying with back-off while
the database refuses (a full disk): until the end is on disk the run stays
in memory (`Live.pending`), reads show it ended, and a new start waits.

Stops of every kind (a call, a kill, a timer) go through `_ask_stop`: the
first requested reason sticks, the worker gets SIGTERM (it asks the guest
to shut down) and a KILL_GRACE deadline is set; when it falls the worker's
whole process group gets SIGKILL. The `stopping` record follows; failing to
write it changes nothing (the end is what counts). Timers live in one
`Scheduler`; idle and heartbeat deadlines are re-checked when they fall
(activity only updates a timestamp), so console output costs no heap work.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import signal as signal_mod
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from msbd.config import Settings
from msbd.daemon import procfs, states
from msbd.daemon.access import vm_identity
from msbd.daemon.console import ConsoleLog, LogChunk, log_path, read_log
from msbd.daemon.doctor import HostCheck
from msbd.daemon.limits import Limits, Share, Usage
from msbd.daemon.live import Live, end_detail, end_reason
from msbd.daemon.pipes import LineSplitter, pump
from msbd.daemon.signaller import Signaller
from msbd.daemon.spawn import spawn_worker, worker_environ
from msbd.daemon.timers import (
    Lateness,
    Scheduler,
    TimerKind,
    heartbeat_deadline,
    idle_deadline,
    max_duration_deadline,
)
from msbd.db.store import RunEnd, Store
from msbd.errors import Conflict, LaunchFailed, StoreError, TimedOut
from msbd.log import ctx
from msbd.model import (
    LIVE_STATES,
    Reason,
    SandboxInfo,
    SandboxRef,
    State,
    WorkerSpec,
)

log = logging.getLogger("msbd.supervisor")

_ENCODER = msgspec.json.Encoder()
# Signals after which a sandbox is expected to go on running.
_NON_FATAL = frozenset({signal_mod.SIGSTOP, signal_mod.SIGCONT, signal_mod.SIGTSTP,
                        signal_mod.SIGTTIN, signal_mod.SIGTTOU, signal_mod.SIGWINCH,
                        signal_mod.SIGURG, signal_mod.SIGCHLD})
# After the worker exits, how long its pipes may take to report EOF (the
# guest's console can lag the process by a few buffered writes).
_DRAIN_TIMEOUT = 2.0
_LINE_MAX = 4096
# Recording a run's end is retried with this back-off while the database refuses.
_RETRY_FIRST, _RETRY_MAX = 0.05, 5.0
# How long a call that waits for a run's end waits for a refused write to land.
_RECORD_WAIT = 30.0


class Supervisor:
    def __init__(self, *, settings: Settings, store: Store, scheduler: Scheduler,
                 task_group: anyio.abc.TaskGroup, host: HostCheck,
                 signaller: Signaller | None = None) -> None:
        self._settings = settings
        self._store = store
        self._timers = scheduler
        self._tg = task_group
        self._signaller = signaller
        self._host = host
        self._daemon_uid = os.getuid()
        self.log_dir = Path(settings.state_dir) / "logs"
        self.live: dict[int, Live] = {}
        self._limits = Limits(settings, admins=frozenset({0, self._daemon_uid}))
        # sandbox id -> set once a launch in progress has a live worker (or failed).
        self._launching: dict[int, anyio.Event] = {}
        self._changed = anyio.Event()
        self._give_up = anyio.Event()  # shutdown: stop retrying refused writes

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

    def check_limits(self, info: SandboxInfo) -> None:
        """`LimitReached` if starting `info`'s sandbox now would pass a limit."""
        self._limits.check(_share(info), name=info.name)

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
        self._limits.reserve(ref.id, _share(info), name=ref.name)
        launched = self._launching[ref.id] = anyio.Event()
        try:
            with anyio.CancelScope(shield=True):
                live = await self._launch(ref, libkrun)
        except BaseException:
            self._limits.release(ref.id)
            raise
        finally:
            del self._launching[ref.id]
            launched.set()
        timeout = self._settings.start_timeout if timeout is None else timeout
        with anyio.move_on_after(timeout):
            await _first(live.running.wait, live.exited.wait)
        if live.running.is_set():
            return await self._store.get(ref)
        if not live.exited.is_set():
            await self._request_stop(live, Reason.LAUNCH_FAILED, grace=0.0,
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
        record, owner = await self._store.begin_run(ref, now=time.time(),
                                                    expect=states.startable)
        assert record.run is not None and record.spec is not None
        spec, run_id = record.spec, record.run.id
        fields = {f: getattr(spec, f) for f in spec.__struct_fields__}
        uid, gid, groups = vm_identity(owner, self._daemon_uid)
        worker_spec = WorkerSpec(**fields, heartbeat_interval=self._settings.heartbeat_interval,
                                 shutdown_grace=self._settings.stop_timeout, libkrun=libkrun,
                                 uid=uid, gid=gid, groups=groups)
        try:
            console = ConsoleLog(log_path(self.log_dir, ref.id),
                                 max_bytes=self._settings.log_max_bytes)
        except OSError as exc:
            message = f"cannot open the console log: {exc.strerror}"
            await self._end_unspawned(ref, message)
            raise LaunchFailed(f"sandbox {ref.name!r} failed to launch: {message}",
                               data={"sandbox": ref.name}) from exc
        argv = [self._settings.worker_python, "-m", "msbd.vm"]
        try:
            worker = spawn_worker(argv, worker_environ(self._settings.worker_env),
                                  _ENCODER.encode(worker_spec))
        except LaunchFailed as exc:
            console.close()
            await self._end_unspawned(ref, exc.message)
            raise LaunchFailed(f"sandbox {ref.name!r} failed to launch: {exc.message}",
                               data={"sandbox": ref.name}) from exc
        now = self._timers.now()
        live = Live(ref=ref, owner_uid=record.owner_uid, spec=spec, run_id=run_id,
                    worker=worker, console=console, started=now, last_activity=now,
                    last_beat=now)
        self.live[ref.id] = live
        self._notify_change()
        log.info("worker spawned", extra=ctx(sandbox=ref.name, pid=worker.pid, run=run_id))
        self._tg.start_soon(self._watch, live)
        if (deadline := max_duration_deadline(now, spec.max_duration)) is not None:
            self._timers.set(ref.id, TimerKind.MAX_DURATION, deadline)
        with contextlib.suppress(StoreError):  # the end, when it comes, is what matters
            await self._store.set_run_process(ref, run_id, pid=worker.pid,
                                              proc_start=procfs.start_ticks(worker.pid),
                                              boot_id=procfs.boot_id())
        return live

    async def _end_unspawned(self, ref: SandboxRef, detail: str) -> None:
        await self._store.transition(ref, State.FAILED, now=time.time(),
                                     expect={State.STARTING},
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

    # --- the watcher ------------------------------------------------------------------

    async def _watch(self, live: Live) -> None:
        """Own one worker from spawn to its recorded end."""
        result: tuple[int | None, int | None] | None = None
        try:
            async with anyio.create_task_group() as tg:
                status = LineSplitter(functools.partial(self._on_status, live, tg),
                                      limit=_LINE_MAX)
                tg.start_soon(pump, live.worker.status_r, status.feed)
                tg.start_soon(pump, live.worker.console_r,
                              functools.partial(self._on_console, live))
                await anyio.wait_readable(live.worker.pidfd)
                result = self._reap(live)
                # The pipes normally reach EOF with the process; never wait long for them.
                tg.cancel_scope.deadline = anyio.current_time() + _DRAIN_TIMEOUT
        except Exception:
            log.exception("watcher failed", extra=ctx(sandbox=live.name, pid=live.pid))
        finally:
            with anyio.CancelScope(shield=True):
                if result is None:
                    result = await self._kill_and_reap(live)
                await self._finish(live, *result)

    def _reap(self, live: Live) -> tuple[int | None, int | None]:
        """(exit_code, signal) of the exited worker, reaped through its pidfd."""
        info = os.waitid(os.P_PIDFD, live.worker.pidfd, os.WEXITED)
        live.reaped = True
        if info is None:  # not possible with WEXITED and no WNOHANG
            return None, None
        if info.si_code == os.CLD_EXITED:
            return info.si_status, None
        return None, info.si_status

    async def _kill_and_reap(self, live: Live) -> tuple[int | None, int | None]:
        self._kill_group(live)
        with anyio.move_on_after(5.0):
            await anyio.wait_readable(live.worker.pidfd)
        try:
            return self._reap(live)
        except ChildProcessError:
            return None, signal_mod.SIGKILL

    def _on_status(self, live: Live, tg: anyio.abc.TaskGroup, line: str) -> None:
        """One line from fd 98 (called from the pipe's read callback: never blocks)."""
        if line == "heartbeat":
            live.last_beat = self._timers.now()
        elif line == "entering":
            live.entered = True
            tg.start_soon(self._entered, live)  # in the watcher's group: before the end
        elif line.startswith("error"):
            live.error_line = line[5:].strip()[:_LINE_MAX] or "unknown error"
            log.warning("worker error: %s", live.error_line, extra=ctx(sandbox=live.name))

    async def _entered(self, live: Live) -> None:
        now = self._timers.now()
        live.last_beat = now
        async with live.lock:
            if live.state is not State.STARTING or live.requested is not None:
                return
            with anyio.CancelScope(shield=True):
                await self._store.transition(live.ref, State.RUNNING, now=time.time(),
                                             expect={State.STARTING})
            live.state = State.RUNNING
        self._arm_idle(live)
        self._timers.set(live.ref.id, TimerKind.HEARTBEAT, heartbeat_deadline(
            now, self._settings.heartbeat_interval, self._settings.heartbeat_misses))
        live.running.set()
        log.info("running", extra=ctx(sandbox=live.name, pid=live.pid))

    def _on_console(self, live: Live, chunk: bytes) -> None:
        """Console output (from the pipe's read callback): into the log, and it is activity."""
        live.last_activity = self._timers.now()
        try:
            live.console.write(chunk)
        except OSError as exc:
            if not live.console_full:
                log.warning("cannot write the console log: %s", exc.strerror,
                            extra=ctx(sandbox=live.name))
            live.console_full = True
        tail = chunk.rstrip(b"\n").rpartition(b"\n")[2]
        if tail:
            live.last_output_line = tail[-_LINE_MAX:].decode(errors="replace")
        live.output.set()
        live.output = anyio.Event()

    async def _finish(self, live: Live, exit_code: int | None, sig: int | None) -> None:
        """Give back what the run held, then record its end until it is on disk (shielded)."""
        ref, ended_at = live.ref, time.time()
        reason = end_reason(live, exit_code, sig)
        end = RunEnd(reason=reason, exit_code=exit_code, signal=sig,
                     detail=end_detail(live, reason, exit_code, sig))
        to = states.final_state(reason)
        self._timers.cancel_all(ref.id)
        live.worker.close()
        live.console.close()
        self._limits.release(ref.id)
        live.pending = (to, end, ended_at)
        live.exited.set()
        live.output.set()
        delay = _RETRY_FIRST
        try:
            while True:
                try:
                    live.final, _ = await self._store.transition(
                        ref, to, now=ended_at, expect=LIVE_STATES & states.sources(to), end=end)
                    break
                except StoreError as exc:
                    if live.write_error is None:
                        log.error("cannot record the end of a run, retrying: %s", exc,
                                  extra=ctx(sandbox=ref.name))
                    live.write_error = exc.message
                except Exception:
                    log.exception("could not record the end of a run", extra=ctx(sandbox=ref.name))
                    break
                with anyio.move_on_after(delay):
                    await self._give_up.wait()
                if self._give_up.is_set():
                    log.error("daemon stopping: the end of this run was not recorded; the "
                              "next start records it as daemon_lost", extra=ctx(sandbox=ref.name))
                    break
                delay = min(delay * 2, _RETRY_MAX)
            if live.write_error is not None and live.final is not None:
                log.info("recorded the end of the run after all", extra=ctx(sandbox=ref.name))
        finally:
            self.live.pop(ref.id, None)
            self._notify_change()
            live.ended.set()
        log.info("run ended", extra=ctx(sandbox=ref.name, reason=reason, exit_code=exit_code,
                                        signal=sig, pid=live.pid))

    # --- stopping -------------------------------------------------------------------

    async def _request_stop(self, live: Live, reason: Reason, *, grace: float,
                            detail: str | None = None, sig: int = signal_mod.SIGTERM) -> None:
        """Ask `live` to end for `reason` (the first reason asked sticks), then record it."""
        if self._ask_stop(live, reason, grace=grace, detail=detail, sig=sig):
            await self._record_stopping(live, reason)

    def _ask_stop(self, live: Live, reason: Reason, *, grace: float, detail: str | None = None,
                  sig: int = signal_mod.SIGTERM) -> bool:
        """The signal, at once (no await): SIGTERM and a KILL_GRACE deadline, or SIGKILL.

        The `stopping` record follows separately: a burst of timers (a thousand
        idle deadlines in one second) must not wait on a thousand fsync'd
        commits before the workers hear about it. The reason is already in
        memory, so the recorded end is right whichever lands first. Returns
        whether a `stopping` record is due.
        """
        if live.exited.is_set():
            return False
        if live.requested is None:
            live.requested = reason
            live.stop_detail = detail
        if grace <= 0 or sig == signal_mod.SIGKILL:
            self._kill_group(live)
        else:
            self._signal(live, sig)
            deadline = self._timers.now() + grace
            current = self._timers.get(live.ref.id, TimerKind.KILL_GRACE)
            if current is None or deadline < current:
                self._timers.set(live.ref.id, TimerKind.KILL_GRACE, deadline)
        # A start that timed out goes straight to `failed`, not through `stopping`.
        return reason is not Reason.LAUNCH_FAILED

    async def _record_stopping(self, live: Live, reason: Reason) -> None:
        async with live.lock:
            if live.exited.is_set() or live.state not in (State.STARTING, State.RUNNING):
                return
            with anyio.CancelScope(shield=True):
                try:
                    await self._store.transition(
                        live.ref, State.STOPPING, now=time.time(),
                        expect={State.STARTING, State.RUNNING}, detail=str(reason))
                except Conflict:
                    return  # it ended meanwhile; the watcher records the end
                except StoreError as exc:
                    # The worker has its signal; the end is what gets recorded.
                    log.warning("cannot record stopping: %s", exc, extra=ctx(sandbox=live.name))
                    return
            live.state = State.STOPPING
            log.info("stopping", extra=ctx(sandbox=live.name, reason=reason))

    def _signal(self, live: Live, sig: int) -> None:
        """Send `sig` to the worker (through the signalling thread when there is one)."""
        if live.reaped:
            return
        if self._signaller is not None:
            self._signaller.send(live.worker.pidfd, sig)
            return
        with contextlib.suppress(ProcessLookupError):
            signal_mod.pidfd_send_signal(live.worker.pidfd, sig)

    def _kill_group(self, live: Live) -> None:
        """SIGKILL the worker's process group (its session): the worker and all it forked.

        Safe against pid reuse: until the worker is reaped its pid, and so its
        group id, cannot be given to another process.
        """
        if live.reaped:
            return
        try:
            os.killpg(live.pid, signal_mod.SIGKILL)
        except ProcessLookupError:
            self._signal(live, signal_mod.SIGKILL)

    async def stop(self, ref: SandboxRef, *, timeout: float,
                   reason: Reason = Reason.STOP_REQUESTED,
                   detail: str | None = None) -> SandboxInfo:
        live = await self._current(ref)
        if live is None:
            return await self._store.get(ref)
        await self._request_stop(live, reason, grace=timeout, detail=detail)
        return await self._final(live)

    async def kill(self, ref: SandboxRef, sig: int) -> SandboxInfo:
        live = await self._current(ref)
        if live is None or live.exited.is_set():
            raise Conflict(f"sandbox {ref.name!r} is not running", data={"sandbox": ref.name})
        if sig in _NON_FATAL:
            live.last_activity = self._timers.now()
            self._signal(live, sig)
            return await self._store.get(ref)
        await self._request_stop(live, Reason.KILLED, grace=self._settings.stop_timeout, sig=sig)
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
        if live is None or live.pending is None or info.run is None:
            return info
        to, end, ended_at = live.pending
        when = dt.datetime.fromtimestamp(ended_at, dt.UTC)
        run = msgspec.structs.replace(info.run, ended_at=when, reason=end.reason,
                                      exit_code=end.exit_code, signal=end.signal,
                                      detail=end.detail)
        return msgspec.structs.replace(info, state=to, updated_at=when, run=run)

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

    def _arm_idle(self, live: Live) -> None:
        deadline = idle_deadline(live.last_activity, live.spec.idle_timeout)
        if deadline is not None:
            self._timers.set(live.ref.id, TimerKind.IDLE, deadline)

    def fire(self, key: int, kind: TimerKind) -> None:
        """Scheduler callback, for one due deadline. Decides and signals right here
        (no await, so a thousand due deadlines are a thousand signals in a row);
        only the database record is left to a task in our group."""
        live = self.live.get(key)
        if live is None or live.exited.is_set():
            return
        reason = self._due(live, kind, self._timers.now())
        if reason is None:
            return
        if self._ask_stop(live, reason, grace=self._settings.stop_timeout,
                          detail=self._timer_detail(live, reason)):
            self._tg.start_soon(self._record_stopping, live, reason)

    def _due(self, live: Live, kind: TimerKind, now: float) -> Reason | None:
        """The reason `kind` ends `live` now, or None (re-armed, or the grace SIGKILL sent)."""
        key = live.ref.id
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
                self._kill_group(live)
                return None

    def _timer_detail(self, live: Live, reason: Reason) -> str:
        if reason is Reason.IDLE_TIMEOUT:
            return f"idle for {live.spec.idle_timeout:g}s"
        if reason is Reason.MAX_DURATION:
            return f"ran for {live.spec.max_duration:g}s"
        return f"no heartbeat for {self._timers.now() - live.last_beat:.1f}s"

    def timer_lateness(self) -> Lateness:
        """How late deadlines fired (seconds), over the scheduler's recent samples."""
        return self._timers.lateness()

    # --- observing --------------------------------------------------------------------

    async def logs(self, ref: SandboxRef, *, offset: int | None, tail: int | None, limit: int,
                   wait: float | None) -> LogChunk:
        path = log_path(self.log_dir, ref.id)
        read = functools.partial(read_log, path, offset=offset, tail=tail, limit=limit)
        chunk = await anyio.to_thread.run_sync(read)
        live = self.live.get(ref.id)
        if chunk.data or not wait or tail is not None or live is None or live.exited.is_set():
            return chunk
        output = live.output
        with anyio.move_on_after(wait):
            await output.wait()
        return await anyio.to_thread.run_sync(read)

    def metrics(self, ref: SandboxRef) -> tuple[int, procfs.Usage]:
        """(pid, usage) of the running worker. Read only while the worker is unreaped,
        on the event loop that alone reaps it: the pid cannot belong to anyone else."""
        live = self.live.get(ref.id)
        usage = None
        if live is not None and not live.reaped:
            usage = procfs.usage(live.pid)
        if live is None or usage is None:
            raise Conflict(f"sandbox {ref.name!r} is not running", data={"sandbox": ref.name})
        return live.pid, usage


def _share(info: SandboxInfo) -> Share:
    assert info.spec is not None
    return Share(info.owner_uid, info.spec.vcpus, info.spec.memory_mib)


async def _first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of `waits` returns."""
    async with anyio.create_task_group() as tg:
        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            tg.cancel_scope.cancel()
        for wait in waits:
            tg.start_soon(one, wait)
