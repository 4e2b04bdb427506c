"""Launch workers, watch them until they end, stop them; every end gets one recorded reason.

How it works
------------
`start` reserves the sandbox's share of the limits (synchronously, so two
starts cannot both pass the check), records a new run (`starting`) in one
transaction, spawns the worker with the fd map of DESIGN.md, records its pid
with its process start time and boot id, and hands it to a watcher task
owned by the supervisor's task group. The watcher reads the status pipe
(`entering` -> `running`, `heartbeat`, `error ...`), copies the console pipe
into the sandbox's log, and waits on the worker's pidfd. When the worker is
gone it reaps it, decides the reason (`states.end_reason`: a reason the
daemon requested wins) and writes the end in one shielded transaction.

Stops of every kind (a call, a kill, a timer) go through `_request_stop`:
the first requested reason sticks, the sandbox moves to `stopping`, the
worker gets SIGTERM (it asks the guest to shut down) and a KILL_GRACE
deadline is set; when it falls the worker's whole process group gets
SIGKILL. Timers live in one `Scheduler`; idle and heartbeat deadlines are
re-checked when they fall (activity only updates a timestamp), so console
output costs no heap operations.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pwd
import signal as signal_mod
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import assert_never

import anyio
import anyio.abc
import msgspec

from msbd.config import Settings
from msbd.daemon import procfs, states
from msbd.daemon.console import ConsoleLog, LogChunk, log_path, read_log
from msbd.daemon.doctor import HostCheck
from msbd.daemon.pipes import LineSplitter, pump
from msbd.daemon.signaller import Signaller
from msbd.daemon.spawn import Worker, spawn_worker, worker_environ
from msbd.daemon.timers import Lateness, Scheduler, TimerKind, heartbeat_deadline
from msbd.db.store import RunEnd, Store
from msbd.errors import Conflict, LaunchFailed, LimitReached, TimedOut
from msbd.log import ctx
from msbd.model import LIVE_STATES, LaunchSpec, Reason, SandboxInfo, State, WorkerSpec

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


@dataclass(eq=False)
class Live:
    """One running worker, as the daemon tracks it in memory."""

    name: str
    spec: LaunchSpec
    run_id: int
    worker: Worker
    console: ConsoleLog
    state: State = State.STARTING
    started: float = 0.0
    last_activity: float = 0.0
    last_beat: float = 0.0
    requested: Reason | None = None
    stop_detail: str | None = None
    entered: bool = False
    reaped: bool = False
    console_full: bool = False
    error_line: str | None = None
    last_output_line: str = ""
    running: anyio.Event = field(default_factory=anyio.Event)
    ended: anyio.Event = field(default_factory=anyio.Event)
    output: anyio.Event = field(default_factory=anyio.Event)
    final: SandboxInfo | None = None
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def pid(self) -> int:
        return self.worker.pid


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
        self.log_dir = Path(settings.state_dir) / "logs"
        self.live: dict[str, Live] = {}
        # name -> (vcpus, memory_mib) for every starting or live sandbox.
        self._reserved: dict[str, tuple[int, int]] = {}
        # name -> set once a launch in progress has a live worker (or failed).
        self._launching: dict[str, anyio.Event] = {}
        self._changed = anyio.Event()

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

    def usage(self) -> tuple[int, int, int]:
        """(sandboxes, vcpus, memory MiB) held by starting and live sandboxes."""
        values = self._reserved.values()
        return len(values), sum(v for v, _ in values), sum(m for _, m in values)

    def _reserve(self, spec: LaunchSpec) -> None:
        self.check_limits(spec)
        self._reserved[spec.name] = (spec.vcpus, spec.memory_mib)

    def check_limits(self, spec: LaunchSpec) -> None:
        """`LimitReached` if starting `spec` now would pass a configured limit."""
        s = self._settings
        count, vcpus, memory = self.usage()
        data = {"sandbox": spec.name}
        if count + 1 > s.max_sandboxes:
            raise LimitReached(f"limit reached: at most {s.max_sandboxes} live sandboxes",
                               data=data | {"limit": "max_sandboxes"})
        if vcpus + spec.vcpus > s.max_vcpus:
            raise LimitReached(f"limit reached: {vcpus} of {s.max_vcpus} vcpus in use, "
                               f"{spec.vcpus} more asked", data=data | {"limit": "max_vcpus"})
        if memory + spec.memory_mib > s.max_memory_mib:
            raise LimitReached(f"limit reached: {memory} of {s.max_memory_mib} MiB in use, "
                               f"{spec.memory_mib} more asked",
                               data=data | {"limit": "max_memory_mib"})

    def busy(self, name: str) -> bool:
        return name in self._reserved

    # --- start ------------------------------------------------------------------

    async def start(self, info: SandboxInfo, *, timeout: float | None) -> SandboxInfo:
        """Start `info`'s sandbox; answers once the worker entered libkrun."""
        name = info.name
        libkrun = self.check_can_launch()
        if self.busy(name):
            raise Conflict(f"sandbox {name!r} is already {self._live_state(name)}",
                           data={"sandbox": name})
        if info.state not in states.startable:
            raise Conflict(f"sandbox {name!r} is {info.state}",
                           data={"sandbox": name, "state": info.state})
        self._reserve(info.spec)
        launched = self._launching[name] = anyio.Event()
        try:
            with anyio.CancelScope(shield=True):
                live = await self._launch(info.spec, libkrun, owner_uid=info.owner_uid)
        except BaseException:
            self._reserved.pop(name, None)
            raise
        finally:
            del self._launching[name]
            launched.set()
        timeout = self._settings.start_timeout if timeout is None else timeout
        with anyio.move_on_after(timeout):
            await _first(live.running.wait, live.ended.wait)
        if live.running.is_set():
            return await self._store.get_sandbox(name)
        if not live.ended.is_set():
            await self._request_stop(live, Reason.LAUNCH_FAILED, grace=0.0,
                                     detail=f"the worker did not enter libkrun within "
                                            f"{timeout:g}s")
            await live.ended.wait()
        final = await self._final(live)
        run = final.run
        if run is not None and run.reason is Reason.STOP_REQUESTED:
            raise Conflict(f"sandbox {name!r} was stopped while starting",
                           data={"sandbox": name})
        detail = (run.detail if run is not None else None) or "the worker ended before libkrun"
        raise LaunchFailed(f"sandbox {name!r} failed to launch: {detail}",
                           data={"sandbox": name,
                                 "reason": str(run.reason) if run and run.reason else None,
                                 "exit_code": run.exit_code if run else None})

    async def _launch(self, spec: LaunchSpec, libkrun: str, *, owner_uid: int) -> Live:
        """Record the new run, spawn its worker, hand it to a watcher (shielded by the caller)."""
        name = spec.name
        info, _ = await self._store.transition(name, State.STARTING, now=time.time(),
                                               expect=states.startable, start_run=True)
        assert info.run is not None
        run_id = info.run.id
        fields = {f: getattr(spec, f) for f in spec.__struct_fields__}
        uid, gid, groups = vm_identity(owner_uid)
        worker_spec = WorkerSpec(**fields, heartbeat_interval=self._settings.heartbeat_interval,
                                 shutdown_grace=self._settings.stop_timeout, libkrun=libkrun,
                                 uid=uid, gid=gid, groups=groups)
        try:
            console = ConsoleLog(log_path(self.log_dir, name),
                                 max_bytes=self._settings.log_max_bytes)
        except OSError as exc:
            message = f"cannot open the console log: {exc.strerror}"
            await self._end_unspawned(name, message)
            raise LaunchFailed(f"sandbox {name!r} failed to launch: {message}",
                               data={"sandbox": name}) from exc
        argv = [self._settings.worker_python, "-m", "msbd.vm"]
        try:
            worker = spawn_worker(argv, worker_environ(self._settings.worker_env),
                                  _ENCODER.encode(worker_spec))
        except LaunchFailed as exc:
            console.close()
            await self._end_unspawned(name, exc.message)
            raise LaunchFailed(f"sandbox {name!r} failed to launch: {exc.message}",
                               data={"sandbox": name}) from exc
        now = self._timers.now()
        live = Live(name=name, spec=spec, run_id=run_id, worker=worker, console=console,
                    started=now, last_activity=now, last_beat=now)
        self.live[name] = live
        self._notify_change()
        log.info("worker spawned", extra=ctx(sandbox=name, pid=worker.pid, run=run_id))
        self._tg.start_soon(self._watch, live)
        if spec.max_duration is not None:
            self._timers.set(name, TimerKind.MAX_DURATION, now + spec.max_duration)
        await self._store.set_run_process(name, run_id, pid=worker.pid,
                                          proc_start=procfs.start_ticks(worker.pid),
                                          boot_id=procfs.boot_id())
        return live

    async def _end_unspawned(self, name: str, detail: str) -> None:
        await self._store.transition(name, State.FAILED, now=time.time(),
                                     expect={State.STARTING},
                                     end=RunEnd(reason=Reason.LAUNCH_FAILED, detail=detail))

    def _live_state(self, name: str) -> str:
        live = self.live.get(name)
        return str(live.state) if live is not None else "starting"

    async def _final(self, live: Live) -> SandboxInfo:
        if live.final is not None:
            return live.final
        return await self._store.get_sandbox(live.name)

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
                await self._store.transition(live.name, State.RUNNING, now=time.time(),
                                             expect={State.STARTING})
            live.state = State.RUNNING
        self._arm_idle(live, now)
        self._timers.set(live.name, TimerKind.HEARTBEAT, heartbeat_deadline(
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
        """Record the end of `live`'s run and let go of everything it held (shielded)."""
        name = live.name
        reason = self._end_reason(live, exit_code, sig)
        detail = self._end_detail(live, reason, exit_code, sig)
        to = states.final_state(reason)
        try:
            live.final, _ = await self._store.transition(
                name, to, now=time.time(), expect=LIVE_STATES & states.sources(to),
                end=RunEnd(reason=reason, exit_code=exit_code, signal=sig, detail=detail))
        except Exception:
            log.exception("could not record the end of a run", extra=ctx(sandbox=name))
        finally:
            self._timers.cancel_all(name)
            live.worker.close()
            live.console.close()
            self.live.pop(name, None)
            self._reserved.pop(name, None)
            self._notify_change()
            live.ended.set()
            live.output.set()
        log.info("run ended", extra=ctx(sandbox=name, reason=reason, exit_code=exit_code,
                                        signal=sig, pid=live.pid))

    def _end_reason(self, live: Live, exit_code: int | None, sig: int | None) -> Reason:
        if live.requested is Reason.LAUNCH_FAILED:
            return Reason.LAUNCH_FAILED
        if exit_code is None and sig is None:
            sig = signal_mod.SIGKILL
        return states.end_reason(requested=live.requested, exit_code=exit_code, signal=sig,
                                 entered=live.entered, worker_error=live.error_line is not None)

    @staticmethod
    def _end_detail(live: Live, reason: Reason, exit_code: int | None, sig: int | None
                    ) -> str | None:
        parts: list[str] = []
        if live.stop_detail:
            parts.append(live.stop_detail)
        if reason in (Reason.LAUNCH_FAILED, Reason.WORKER_CRASHED):
            if live.error_line:
                parts.append(live.error_line)
            elif sig is not None:
                parts.append(f"the worker was killed by {_signame(sig)}")
            elif exit_code is not None:
                parts.append(f"the worker exited with status {exit_code}")
            if live.last_output_line and live.last_output_line not in parts:
                parts.append(f"last output: {live.last_output_line}")
        return "; ".join(parts) or None

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
        if live.ended.is_set():
            return False
        if live.requested is None:
            live.requested = reason
            live.stop_detail = detail
        if grace <= 0 or sig == signal_mod.SIGKILL:
            self._kill_group(live)
        else:
            self._signal(live, sig)
            deadline = self._timers.now() + grace
            current = self._timers.get(live.name, TimerKind.KILL_GRACE)
            if current is None or deadline < current:
                self._timers.set(live.name, TimerKind.KILL_GRACE, deadline)
        # A start that timed out goes straight to `failed`, not through `stopping`.
        return reason is not Reason.LAUNCH_FAILED

    async def _record_stopping(self, live: Live, reason: Reason) -> None:
        async with live.lock:
            if live.ended.is_set() or live.state not in (State.STARTING, State.RUNNING):
                return
            with anyio.CancelScope(shield=True):
                try:
                    await self._store.transition(
                        live.name, State.STOPPING, now=time.time(),
                        expect={State.STARTING, State.RUNNING}, detail=str(reason))
                except Conflict:
                    return  # it ended meanwhile; the watcher records the end
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

    async def stop(self, name: str, *, timeout: float, reason: Reason = Reason.STOP_REQUESTED,
                   detail: str | None = None) -> SandboxInfo:
        live = await self._current(name)
        if live is None:
            return await self._store.get_sandbox(name)
        await self._request_stop(live, reason, grace=timeout, detail=detail)
        await live.ended.wait()
        return await self._final(live)

    async def kill(self, name: str, sig: int) -> SandboxInfo:
        live = await self._current(name)
        if live is None:
            raise Conflict(f"sandbox {name!r} is not running", data={"sandbox": name})
        if sig in _NON_FATAL:
            live.last_activity = self._timers.now()
            self._signal(live, sig)
            return await self._store.get_sandbox(name)
        await self._request_stop(live, Reason.KILLED, grace=self._settings.stop_timeout, sig=sig)
        if sig == signal_mod.SIGKILL:
            await live.ended.wait()
            return await self._final(live)
        return await self._store.get_sandbox(name)

    async def wait(self, name: str, *, timeout: float | None) -> SandboxInfo:
        live = await self._current(name)
        if live is None:
            return await self._store.get_sandbox(name)
        if timeout is None:
            await live.ended.wait()
        else:
            with anyio.move_on_after(timeout):
                await live.ended.wait()
            if not live.ended.is_set():
                raise TimedOut(f"sandbox {name!r} still running after {timeout:g}s",
                               data={"sandbox": name})
        return await self._final(live)

    def touch(self, name: str) -> None:
        live = self.live.get(name)
        if live is None:
            raise Conflict(f"sandbox {name!r} is not running", data={"sandbox": name})
        live.last_activity = self._timers.now()

    async def _current(self, name: str) -> Live | None:
        """The live worker of `name`, waiting out a launch in progress."""
        launching = self._launching.get(name)
        if launching is not None:
            await launching.wait()
        return self.live.get(name)

    async def shutdown(self, *, grace: float) -> None:
        """Stop every live sandbox (daemon exit): SIGTERM, SIGKILL after `grace`."""
        lives = list(self.live.values())
        if not lives:
            return
        log.info("stopping %d sandboxes", len(lives))
        async with anyio.create_task_group() as tg:
            for live in lives:
                tg.start_soon(functools.partial(self.stop, live.name, timeout=grace,
                                                detail="daemon shutting down"))

    # --- timers ---------------------------------------------------------------------

    def _arm_idle(self, live: Live, now: float) -> None:
        if live.spec.idle_timeout is not None:
            self._timers.set(live.name, TimerKind.IDLE, live.last_activity
                             + live.spec.idle_timeout)

    def fire(self, name: str, kind: TimerKind) -> None:
        """Scheduler callback, for one due deadline. Decides and signals right here
        (no await, so a thousand due deadlines are a thousand signals in a row);
        only the database record is left to a task in our group."""
        live = self.live.get(name)
        if live is None:
            return
        reason = self._due(live, kind, self._timers.now())
        if reason is None:
            return
        if self._ask_stop(live, reason, grace=self._settings.stop_timeout,
                          detail=self._timer_detail(live, reason)):
            self._tg.start_soon(self._record_stopping, live, reason)

    def _due(self, live: Live, kind: TimerKind, now: float) -> Reason | None:
        """The reason `kind` ends `live` now, or None (re-armed, or the grace SIGKILL sent)."""
        match kind:
            case TimerKind.IDLE:
                assert live.spec.idle_timeout is not None
                deadline = live.last_activity + live.spec.idle_timeout
                if deadline > now:  # there was activity: look again then
                    self._timers.set(live.name, kind, deadline)
                    return None
                return Reason.IDLE_TIMEOUT
            case TimerKind.MAX_DURATION:
                return Reason.MAX_DURATION
            case TimerKind.HEARTBEAT:
                s = self._settings
                deadline = heartbeat_deadline(live.last_beat, s.heartbeat_interval,
                                              s.heartbeat_misses)
                if deadline > now:
                    self._timers.set(live.name, kind, deadline)
                    return None
                return Reason.HEARTBEAT_LOST
            case TimerKind.KILL_GRACE:
                log.warning("grace over, killing the worker", extra=ctx(sandbox=live.name))
                self._kill_group(live)
                return None
            case _:
                assert_never(kind)

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

    async def logs(self, name: str, *, offset: int | None, tail: int | None, limit: int,
                   wait: float | None) -> LogChunk:
        path = log_path(self.log_dir, name)
        read = functools.partial(read_log, path, offset=offset, tail=tail, limit=limit)
        chunk = await anyio.to_thread.run_sync(read)
        live = self.live.get(name)
        if chunk.data or not wait or tail is not None or live is None:
            return chunk
        output = live.output
        with anyio.move_on_after(wait):
            await output.wait()
        return await anyio.to_thread.run_sync(read)

    def metrics(self, name: str) -> procfs.Usage:
        live = self.live.get(name)
        usage = procfs.usage(live.pid) if live is not None else None
        if live is None or usage is None:
            raise Conflict(f"sandbox {name!r} is not running", data={"sandbox": name})
        return usage

    def pid_of(self, name: str) -> int | None:
        live = self.live.get(name)
        return live.pid if live is not None else None


def vm_identity(owner_uid: int) -> tuple[int | None, int | None, list[int] | None]:
    """(uid, gid, groups) a sandbox's VM runs as: its owner's, looked up now, unless the
    owner is root or the daemon's own uid (then the worker keeps the daemon's)."""
    if owner_uid in (0, os.getuid()):
        return None, None, None
    try:
        entry = pwd.getpwuid(owner_uid)
    except KeyError:
        return owner_uid, owner_uid, []  # no passwd entry: its own number, no groups
    return owner_uid, entry.pw_gid, sorted(os.getgrouplist(entry.pw_name, entry.pw_gid))


async def _first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of `waits` returns."""
    async with anyio.create_task_group() as tg:
        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            tg.cancel_scope.cancel()
        for wait in waits:
            tg.start_soon(one, wait)


def _signame(num: int) -> str:
    try:
        return signal_mod.Signals(num).name
    except ValueError:
        return f"signal {num}"
