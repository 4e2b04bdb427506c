"""The per-run watcher: one task owns one worker from its spawn to its recorded end.

It reads the worker's status pipe (`entering` -> `running`, `heartbeat`,
`error ...`), copies its console pipe into the sandbox's log (console output
is activity), and waits on the worker's pidfd. When the worker is gone it
reaps it, reads the run cgroup's `memory.events` (an OOM kill there ends the
run as `oom_killed`; read before the cgroup is released), gives back what the
run held (timers, pipes, the share of the limits, the cgroup: `on_exit`),
decides the reason (a reason the daemon requested wins) and records the end.
A refused write (a full disk) is retried with back-off for as long as the
daemon runs; meanwhile the end waits in `Live.pending`,
so reads show it and a new start is refused. The watcher's last step,
recorded or not, is `on_ended`.

Pipes are read through the loop's transports (one registration per pipe);
every callback here runs on the loop and never blocks.
"""

from __future__ import annotations

import functools
import logging
import os
import signal as signal_mod
import time
from collections.abc import Callable

import anyio
import anyio.abc

from msbd import states
from msbd.config import Settings
from msbd.contract import StatusWord, parse_status
from msbd.daemon.cgroups import oom_detail
from msbd.daemon.live import Live, end_detail, end_reason
from msbd.daemon.pipes import LineSplitter, pump
from msbd.daemon.stopping import Stopping
from msbd.daemon.timers import Scheduler, TimerKind, heartbeat_deadline
from msbd.db.store import RunEnd, Store
from msbd.errors import StoreError
from msbd.log import ctx
from msbd.model import State

log = logging.getLogger("msbd.supervisor")

# After the worker exits, how long its pipes may take to report EOF (the
# guest's console can lag the process by a few buffered writes).
_DRAIN_TIMEOUT = 2.0
LINE_MAX = 4096
# Recording a run's end is retried with this back-off while the database refuses.
_RETRY_FIRST, _RETRY_MAX = 0.05, 5.0


class Watcher:
    def __init__(self, *, settings: Settings, store: Store, timers: Scheduler,
                 stopping: Stopping, on_exit: Callable[[Live], None],
                 on_ended: Callable[[Live], None], give_up: anyio.Event,
                 urgent: Callable[[], None] = lambda: None) -> None:
        self._settings = settings
        self._urgent = urgent  # an exit to take: in a burst, ahead of the dying workers
        self._store = store
        self._timers = timers
        self._stopping = stopping
        self._on_exit = on_exit
        self._on_ended = on_ended
        self._give_up = give_up  # set at shutdown: stop retrying refused writes

    async def watch(self, live: Live) -> None:
        """Own one worker from spawn to its recorded end."""
        result: tuple[int | None, int | None] | None = None
        try:
            async with anyio.create_task_group() as tg:
                status = LineSplitter(functools.partial(self._on_status, live, tg),
                                      limit=LINE_MAX)
                tg.start_soon(pump, live.worker.status_r, status.feed)
                tg.start_soon(pump, live.worker.console_r,
                              functools.partial(self._on_console, live))
                await anyio.wait_readable(live.worker.pidfd)
                self._urgent()
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

    @staticmethod
    def _reap(live: Live) -> tuple[int | None, int | None]:
        """(exit_code, signal) of the exited worker, reaped through its pidfd."""
        info = os.waitid(os.P_PIDFD, live.worker.pidfd, os.WEXITED)
        live.reaped = True
        if info is None:  # not possible with WEXITED and no WNOHANG
            return None, None
        if info.si_code == os.CLD_EXITED:
            return info.si_status, None
        return None, info.si_status

    async def _kill_and_reap(self, live: Live) -> tuple[int | None, int | None]:
        self._stopping.kill_group(live)
        with anyio.move_on_after(5.0):
            await anyio.wait_readable(live.worker.pidfd)
        try:
            return self._reap(live)
        except ChildProcessError:
            return None, signal_mod.SIGKILL

    def _on_status(self, live: Live, tg: anyio.abc.TaskGroup, line: str) -> None:
        """One line from fd 98 (called from the pipe's read callback: never blocks)."""
        match parse_status(line):
            case (StatusWord.HEARTBEAT, _):
                live.last_beat = self._timers.now()
            case (StatusWord.ENTERING, _):
                live.entered = True
                tg.start_soon(self._entered, live)  # in the watcher's group: before the end
            case (StatusWord.ERROR, text):
                live.error_line = text[:LINE_MAX] or "unknown error"
                log.warning("worker error: %s", live.error_line, extra=ctx(sandbox=live.name))
            case _:
                pass  # not a status line: the contract has no other words

    async def _entered(self, live: Live) -> None:
        now = self._timers.now()
        live.last_beat = now
        async with live.lock:
            if live.state is not State.STARTING or live.requested is not None:
                return
            with anyio.CancelScope(shield=True):
                await self._store.transition(live.ref, State.RUNNING, now=time.time())
            live.state = State.RUNNING
        self._stopping.arm_idle(live)
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
            live.last_output_line = tail[-LINE_MAX:].decode(errors="replace")
        live.output.set()
        live.output = anyio.Event()

    async def _finish(self, live: Live, exit_code: int | None, sig: int | None) -> None:
        """Give back what the run held, then record its end until it is on disk (shielded)."""
        ref, ended_at = live.ref, time.time()
        if live.cgroup is not None:  # before `_on_exit` releases the cgroup
            live.oom = oom_detail(live.cgroup)
        reason = end_reason(live, exit_code, sig)
        end = RunEnd(reason=reason, exit_code=exit_code, signal=sig,
                     detail=end_detail(live, reason, exit_code, sig))
        to = states.final_state(reason)
        self._timers.cancel_all(ref.id)
        live.worker.close()
        live.console.close()
        live.pending = (to, end, ended_at)
        self._on_exit(live)
        live.exited.set()
        live.output.set()
        try:
            await self._record_end(live, to, end, ended_at)
        finally:
            self._on_ended(live)
            live.ended.set()
        log.info("run ended", extra=ctx(sandbox=ref.name, reason=reason, exit_code=exit_code,
                                        signal=sig, pid=live.pid))

    async def _record_end(self, live: Live, to: State, end: RunEnd, ended_at: float) -> None:
        ref, delay = live.ref, _RETRY_FIRST
        while True:
            try:
                live.final, _ = await self._store.transition(ref, to, now=ended_at, end=end)
                break
            except StoreError as exc:
                if live.write_error is None:
                    log.error("cannot record the end of a run, retrying: %s", exc,
                              extra=ctx(sandbox=ref.name))
                live.write_error = exc.message
            except Exception:
                log.exception("could not record the end of a run", extra=ctx(sandbox=ref.name))
                return
            with anyio.move_on_after(delay):
                await self._give_up.wait()
            if self._give_up.is_set():
                log.error("daemon stopping: the end of this run was not recorded; the next "
                          "start records it as daemon_lost", extra=ctx(sandbox=ref.name))
                return
            delay = min(delay * 2, _RETRY_MAX)
        if live.write_error is not None:
            log.info("recorded the end of the run after all", extra=ctx(sandbox=ref.name))
